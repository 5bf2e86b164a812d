#!/usr/bin/env node
// Real Strophe.js (5.x) BOSH clients under Node, for Megaphone's integration tests.
//
// Two connections (a and b) log in over BOSH and exchange messages; the result is
// one JSON line on stdout ({"ok":true,...} + exit 0, or {"ok":false,"error":...}
// + exit 1).  Everything else (progress, Strophe's logs, --debug traffic) goes to
// stderr.  See README.md for usage.
//
// Modes:
//   chat (default)  a->b and b->a, --count messages each, verified exactly once,
//                   in order, byte-exact; then a roster get each; then logout.
//   live            a sends one message to b every --interval-ms for --duration
//                   seconds; b checks in-order, gap-free, duplicate-free delivery.
//                   Prints READY on stdout once both are logged in (the Go test
//                   restarts the server side in the middle of the run).  At the
//                   end waits up to --settle seconds for stragglers, fetches the
//                   roster on both sides (proves the session still works both
//                   ways) and logs out.

import './console-to-stderr.mjs'; // must stay first
import { parseArgs } from 'node:util';
import { Strophe, useLocalAddress } from './node-env.mjs';
import { Run, RUN_ID, numberOption, loginBoth, runChat, runLive } from './common.mjs';
import { StropheClient } from './strophe_client.mjs';

// ---------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------

const USAGE = `usage: node bosh_chat.mjs --url http://127.0.0.1:PORT/bosh --a alice@localhost --b bob@localhost
         [--password PW | env DEMO_PASSWORD] [--mode chat|live] [--count 100]
         [--duration SECONDS] [--interval-ms 200] [--settle SECONDS]
         [--timeout SECONDS] [--wait SECONDS] [--max-retries N] [--pace-ms MS]
         [--address full|bare] [--tolerate-unexpected] [--local-address 127.x.y.z] [--debug] [--strophe-log debug|info|warn|error|fatal]`;

function parseCli(argv) {
    const { values } = parseArgs({
        args: argv,
        strict: true,
        allowPositionals: false,
        options: {
            url: { type: 'string' },
            a: { type: 'string' },
            b: { type: 'string' },
            password: { type: 'string' },
            mode: { type: 'string', default: 'chat' },
            count: { type: 'string', default: '100' },
            duration: { type: 'string', default: '20' },
            'interval-ms': { type: 'string', default: '200' },
            settle: { type: 'string', default: '10' },
            timeout: { type: 'string' },
            wait: { type: 'string', default: '60' },
            'max-retries': { type: 'string', default: '5' },
            'pace-ms': { type: 'string', default: '5' },
            'strophe-log': { type: 'string', default: 'warn' },
            debug: { type: 'boolean', default: false },
            'tolerate-unexpected': { type: 'boolean', default: false },
            address: { type: 'string', default: 'full' },
            'local-address': { type: 'string' },
            help: { type: 'boolean', short: 'h', default: false },
        },
    });
    if (values.help) {
        process.stderr.write(USAGE + '\n');
        process.exit(0);
    }
    const num = (name, min, max) => numberOption(values, name, min, max);
    for (const k of ['url', 'a', 'b']) {
        if (!values[k]) throw new Error(`--${k} is required\n${USAGE}`);
    }
    // http(s): BOSH; ws(s): Strophe's WebSocket transport (RFC 7395).
    if (!/^(https?|wss?):\/\//.test(values.url)) throw new Error('--url must be an http(s) or ws(s) URL');
    const password = values.password ?? process.env.DEMO_PASSWORD;
    if (!password) throw new Error('no password: pass --password or set DEMO_PASSWORD');
    if (!['chat', 'live'].includes(values.mode)) throw new Error(`--mode must be chat or live, got ${values.mode}`);
    if (!['full', 'bare'].includes(values.address)) throw new Error(`--address must be full or bare, got ${values.address}`);
    const levels = { debug: 0, info: 1, warn: 2, error: 3, fatal: 4 };
    if (!(values['strophe-log'] in levels)) throw new Error('--strophe-log must be one of ' + Object.keys(levels));

    const opts = {
        url: values.url,
        a: values.a,
        b: values.b,
        password,
        mode: values.mode,
        count: num('count', 1, 100000),
        duration: num('duration', 1, 3600),
        intervalMs: num('interval-ms', 10, 60000),
        settle: num('settle', 0, 600),
        wait: num('wait', 1, 300),
        maxRetries: num('max-retries', 1, 50),
        paceMs: num('pace-ms', 0, 10000),
        debug: values.debug,
        tolerateUnexpected: values['tolerate-unexpected'],
        address: values.address,
        stropheLog: levels[values['strophe-log']],
    };
    if (values['local-address'] !== undefined) {
        if (!/^127\.\d+\.\d+\.\d+$|^::1$/.test(values['local-address'])) {
            throw new Error('--local-address must be a loopback address');
        }
        useLocalAddress(values['local-address']);
    }
    if (values.timeout !== undefined) {
        opts.timeout = num('timeout', 1, 86400);
    } else {
        // 60 s by default; live mode needs at least duration + settle + login/logout.
        opts.timeout = opts.mode === 'live' ? Math.max(60, opts.duration + opts.settle + 30) : 60;
    }
    return opts;
}

// ---------------------------------------------------------------------------
// Result line: the counters every result carries (see README.md)
// ---------------------------------------------------------------------------

const run = new Run('bosh_chat');

run.stats = () => ({
    sent: run.perSide((c) => c.sent),
    received: run.perSide((c) => c.rx.count),
    http_errors: run.perSide((c) => c.httpErrors),
    stale_ignored: run.perSide((c) => c.rx.stale),
    unexpected: run.perSide((c) => c.rx.unexpected),
    jids: run.perSide((c) => c.jid),
    elapsed_ms: run.elapsed(),
});

const fail = (err) => run.fail(err);
process.on('uncaughtException', (e) => fail(`uncaught exception: ${e && e.stack ? e.stack : e}`));
process.on('unhandledRejection', (e) => fail(`unhandled rejection: ${e && e.stack ? e.stack : e}`));
// Killed by the test harness: still report, and log out what we can (bounded).
for (const sig of ['SIGTERM', 'SIGINT']) process.on(sig, () => fail(`terminated by ${sig}`));

// ---------------------------------------------------------------------------

async function main() {
    let opts;
    try {
        opts = parseCli(process.argv.slice(2));
    } catch (e) {
        fail(`bad arguments: ${e.message}`);
        return;
    }
    run.opts = opts;
    Strophe.setLogLevel(opts.stropheLog);
    run.startTimer(opts.timeout);
    run.note(`mode=${opts.mode} url=${opts.url} a=${opts.a} b=${opts.b} run=${RUN_ID} timeout=${opts.timeout}s wait=${opts.wait}s maxRetries=${opts.maxRetries}`);
    await loginBoth(run, new StropheClient(run, opts, 'a', opts.a, opts.b), new StropheClient(run, opts, 'b', opts.b, opts.a));
    if (opts.mode === 'chat') await runChat(run);
    else await runLive(run);
}

main().catch(fail);
