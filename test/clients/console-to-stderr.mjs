// Imported first by bosh_chat.mjs: every console.* call (including Strophe's own
// logger, which uses console.debug/info, i.e. stdout) goes to stderr, so that
// stdout carries only the machine-readable lines (READY and the final JSON).
import { Console } from 'node:console';

globalThis.console = new Console({ stdout: process.stderr, stderr: process.stderr });
