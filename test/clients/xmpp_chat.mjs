#!/usr/bin/env node
// Real @xmpp/client (xmpp.js 0.14) clients under Node, for Megaphone's integration
// tests: XMPP over TCP (with STARTTLS), direct TLS (XEP-0368) and WebSocket (RFC 7395).
//
// Two connections (a and b) log in and exchange messages; the result is one JSON
// line on stdout ({"ok":true,...} + exit 0, or {"ok":false,"error":...} + exit 1).
// Everything else (progress, --debug traffic) goes to stderr. See README.md.
//
// Transport is picked by @xmpp/client from the --service URI:
//   xmpp://host:port   TCP (@xmpp/tcp); STARTTLS is used when the server offers it
//                      (@xmpp/starttls); --starttls required refuses to authenticate
//                      on a stream that was not upgraded.
//   xmpps://host:port  direct TLS (@xmpp/tls, XEP-0368).
//   ws://host:port/ws  WebSocket (@xmpp/websocket, RFC 7395); wss:// too.
//
// Modes:
//   chat (default)  a->b and b->a, --count messages each, verified exactly once,
//                   in order, byte-exact; then a roster get each; then logout.
//   live            a sends one message to b every --interval-ms for --duration
//                   seconds; b checks in-order, gap-free, duplicate-free delivery.
//                   Prints READY on stdout once both are online. At the end waits
//                   up to --settle seconds for stragglers, fetches the roster on
//                   both sides and logs out.
//
// How TLS options, --insecure and --local-address reach Node (read from
// node_modules/@xmpp/*, version 0.14.0):
//  * @xmpp/tls/lib/Socket.js is a small wrapper whose connect(...args) calls
//    tls.connect(...args). It is used for BOTH direct TLS (ConnectionTLS: args are
//    the socketParameters {host, port}) and STARTTLS (@xmpp/starttls's upgrade():
//    args are {socket, host: <domain>}). Neither path lets a caller add TLS
//    options, so installTlsOptions() wraps that one prototype method (in this
//    process only) to merge ours in: rejectUnauthorized (false with --insecure),
//    ca (--ca), servername (the XMPP domain, so SNI and the certificate check use
//    the domain, not 127.0.0.1) and, for direct TLS only, ALPN "xmpp-client"
//    (XEP-0368); it also bounds the handshake by --step-timeout-ms.
//    NODE_TLS_REJECT_UNAUTHORIZED is not touched.
//  * TCP / direct TLS: Connection.connect() calls this.socketParameters(service)
//    and hands the result to net.Socket#connect / tls.connect. We override
//    socketParameters on each client instance to add localAddress.
//  * WebSocket: @xmpp/websocket does `new WebSocket(url, ["xmpp"])` with the
//    global WebSocket (Node 20 has none without a flag). We install a subclass of
//    the `ws` package's WebSocket that adds our options (localAddress, TLS options
//    for wss://, a handshake timeout).
//  * @xmpp/reconnect is stopped on both clients: any disconnect is a failure, at
//    once, instead of a silent reconnect one second later.

import './console-to-stderr.mjs'; // must stay first
import { parseArgs } from 'node:util';
import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import net from 'node:net';
import tls from 'node:tls';
import WsWebSocket from 'ws';
import { client, xml } from '@xmpp/client';
import TlsSocketWrapper from '@xmpp/tls/lib/Socket.js';

const NS_PING = 'urn:xmpp:ping';
const NS_ROSTER = 'jabber:iq:roster';
const NS_SASL = 'urn:ietf:params:xml:ns:xmpp-sasl';
const NS_SASL2 = 'urn:xmpp:sasl:2';
const NS_TLS = 'urn:ietf:params:xml:ns:xmpp-tls';
const NS_STREAM = 'http://etherx.jabber.org/streams';
const NS_SM = 'urn:xmpp:sm:3';

// ---------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------

const USAGE = `usage: node xmpp_chat.mjs --service xmpp://127.0.0.1:PORT|xmpps://127.0.0.1:PORT|ws://127.0.0.1:PORT/ws
         --domain localhost --a alice --b bob [--password PW | env DEMO_PASSWORD]
         [--mode chat|live] [--count 100] [--pace-ms 0] [--duration SECONDS] [--interval-ms 200]
         [--settle SECONDS] [--timeout SECONDS] [--step-timeout-ms 10000]
         [--starttls required|optional] [--insecure] [--ca FILE.pem]
         [--address full|bare] [--sm auto|off] [--local-address 127.x.y.z] [--debug]`;

function parseCli(argv) {
    const { values } = parseArgs({
        args: argv,
        strict: true,
        allowPositionals: false,
        options: {
            service: { type: 'string' },
            domain: { type: 'string' },
            a: { type: 'string' },
            b: { type: 'string' },
            password: { type: 'string' },
            mode: { type: 'string', default: 'chat' },
            count: { type: 'string', default: '100' },
            'pace-ms': { type: 'string', default: '0' },
            duration: { type: 'string', default: '20' },
            'interval-ms': { type: 'string', default: '200' },
            settle: { type: 'string', default: '10' },
            timeout: { type: 'string' },
            'step-timeout-ms': { type: 'string', default: '10000' },
            starttls: { type: 'string', default: 'optional' },
            insecure: { type: 'boolean', default: false },
            ca: { type: 'string' },
            address: { type: 'string', default: 'full' },
            'local-address': { type: 'string' },
            sm: { type: 'string', default: 'auto' },
            debug: { type: 'boolean', default: false },
            help: { type: 'boolean', short: 'h', default: false },
        },
    });
    if (values.help) {
        process.stderr.write(USAGE + '\n');
        process.exit(0);
    }
    const num = (name, min, max) => {
        const v = Number(values[name]);
        if (!Number.isFinite(v) || v < min || v > max) {
            throw new Error(`--${name} must be a number in [${min}, ${max}], got ${JSON.stringify(values[name])}`);
        }
        return v;
    };
    for (const k of ['service', 'a', 'b']) {
        if (!values[k]) throw new Error(`--${k} is required\n${USAGE}`);
    }
    let url;
    try {
        url = new URL(values.service);
    } catch {
        throw new Error(`--service is not a URI: ${values.service}`);
    }
    const transport = { 'xmpp:': 'tcp', 'xmpps:': 'tls', 'ws:': 'websocket', 'wss:': 'websocket' }[url.protocol];
    if (!transport) throw new Error('--service must be xmpp://, xmpps://, ws:// or wss://');
    if ((transport === 'tcp' || transport === 'tls') && !url.port) {
        // Without a port @xmpp/client would fall back to 5222/5223; tests never want that.
        throw new Error('--service needs an explicit port');
    }

    // --a/--b: a local part ("alice") with --domain, or a bare JID ("alice@localhost").
    let domain = values.domain;
    const account = (k) => {
        const v = values[k];
        const at = v.indexOf('@');
        if (at < 0) return v;
        const d = v.slice(at + 1);
        if (domain && domain !== d) throw new Error(`--${k} ${v} is not in --domain ${domain}`);
        domain = d;
        return v.slice(0, at);
    };
    const a = account('a');
    const b = account('b');
    if (!domain) throw new Error('--domain is required (or give --a/--b as bare JIDs)');
    if (!a || !b || a.includes('/') || b.includes('/')) throw new Error('--a/--b must be local parts or bare JIDs');

    const password = values.password ?? process.env.DEMO_PASSWORD;
    if (!password) throw new Error('no password: pass --password or set DEMO_PASSWORD');
    if (!['chat', 'live'].includes(values.mode)) throw new Error(`--mode must be chat or live, got ${values.mode}`);
    if (!['required', 'optional'].includes(values.starttls)) {
        throw new Error(`--starttls must be required or optional, got ${values.starttls}`);
    }
    if (values.starttls === 'required' && transport !== 'tcp') {
        throw new Error('--starttls required only applies to an xmpp:// (TCP) service');
    }
    if (!['auto', 'off'].includes(values.sm)) throw new Error(`--sm must be auto or off, got ${values.sm}`);
    if (!['full', 'bare'].includes(values.address)) throw new Error(`--address must be full or bare, got ${values.address}`);
    const localAddress = values['local-address'];
    if (localAddress !== undefined && !/^127\.\d{1,3}\.\d{1,3}\.\d{1,3}$|^::1$/.test(localAddress)) {
        throw new Error('--local-address must be a loopback address');
    }
    let ca;
    if (values.ca !== undefined) ca = readFileSync(values.ca, 'utf8');

    const opts = {
        service: values.service,
        transport,
        domain,
        a,
        b,
        password,
        mode: values.mode,
        count: num('count', 1, 100000),
        paceMs: num('pace-ms', 0, 10000),
        duration: num('duration', 1, 3600),
        intervalMs: num('interval-ms', 10, 60000),
        settle: num('settle', 0, 600),
        stepTimeoutMs: num('step-timeout-ms', 100, 120000),
        starttls: values.starttls,
        insecure: values.insecure,
        ca,
        address: values.address,
        localAddress,
        sm: values.sm,
        debug: values.debug,
    };
    if (values.timeout !== undefined) {
        opts.timeout = num('timeout', 1, 86400);
    } else {
        opts.timeout = opts.mode === 'live' ? Math.max(60, opts.duration + opts.settle + 30) : 60;
    }
    return opts;
}

// ---------------------------------------------------------------------------
// Result / failure plumbing
// ---------------------------------------------------------------------------

const t0 = Date.now();
const elapsed = () => Date.now() - t0;
let opts = { mode: 'chat' };
let phase = 'init';
let finished = false;
const clients = {};

function note(msg) {
    process.stderr.write(`[xmpp_chat +${(elapsed() / 1000).toFixed(3)}s] ${msg}\n`);
}

function perSide(fn) {
    const out = {};
    for (const k of ['a', 'b']) if (clients[k]) out[k] = fn(clients[k]);
    return out;
}

/**
 * One boolean for both sides, so the JSON field always has the same type: null
 * while no side knows yet, otherwise `every` (or `some`) over the sides that do.
 */
function allSides(fn, how = 'every') {
    const vals = Object.values(perSide(fn)).filter((v) => v !== null && v !== undefined);
    if (vals.length === 0) return null;
    return how === 'some' ? vals.some(Boolean) : vals.every(Boolean);
}

function stats() {
    return {
        transport: opts.transport,
        service: opts.service,
        // tcp: were the streams upgraded with STARTTLS (the socket became a TLSSocket)?
        // null for xmpps:// and ws(s)://. by_side.starttls has each side's answer.
        starttls: opts.transport === 'tcp' ? allSides((c) => c.info.starttls ?? c.tlsUpgraded) : null,
        // tcp: did the server's first <stream:features> offer <starttls/> (to either side)?
        starttls_offered: opts.transport === 'tcp' ? allSides((c) => c.starttlsOffered, 'some') : null,
        // @xmpp/client's own notion (Connection#isSecure) for every side that got
        // online: true for TLS, and ALSO for ws:// to localhost/127.0.0.1/::1 (it
        // decides whether SASL PLAIN may be used). `tls` says whether a socket is
        // really encrypted.
        secure: allSides((c) => c.info.secure),
        by_side: {
            starttls: opts.transport === 'tcp' ? perSide((c) => c.info.starttls ?? c.tlsUpgraded) : null,
            secure: perSide((c) => c.info.secure ?? null),
        },
        tls: perSide((c) => c.info.tls ?? null),
        sasl: perSide((c) => c.info.sasl ?? null),
        sm: perSide((c) => c.info.sm ?? null),
        local_address: perSide((c) => c.info.localAddress ?? null),
        sent: perSide((c) => c.sent),
        received: perSide((c) => c.rx.count),
        stale_ignored: perSide((c) => c.rx.stale),
        unexpected: perSide((c) => c.rx.unexpected),
        jids: perSide((c) => c.jid || null),
        elapsed_ms: elapsed(),
    };
}

const delay = (ms) => new Promise((r) => setTimeout(r, ms));

/** p, or a rejection after ms (the timer does not keep the process alive). */
function within(p, ms, what) {
    let timer;
    return Promise.race([
        p,
        new Promise((_, reject) => {
            timer = setTimeout(() => reject(new Error(`${what} timed out after ${ms} ms`)), ms);
            timer.unref();
        }),
    ]).finally(() => clearTimeout(timer));
}

async function finish(obj, code) {
    if (finished) return;
    finished = true;
    // On failure, close whatever is still connected (bounded to ~2 s) so no
    // session of ours lingers on the server and disturbs the next run.
    const open = Object.values(clients).filter((c) => c.xmpp && !['offline', 'disconnect'].includes(c.xmpp.status));
    for (const c of Object.values(clients)) c.closing = true;
    if (open.length) {
        const results = await Promise.allSettled(open.map((c) => within(c.xmpp.stop(), 2000, `${c.side} stop`)));
        const okCount = results.filter((r) => r.status === 'fulfilled').length;
        note(`cleanup: stop() finished for ${okCount}/${open.length} connection(s)`);
    }
    process.stdout.write(JSON.stringify(obj) + '\n', () => process.exit(code));
    // Belt and braces: never hang after the result is out.
    setTimeout(() => process.exit(code), 2000).unref();
}

function errorCondition(err) {
    // @xmpp/error's XMPPError (StreamError, SASLError, StanzaError) carries the
    // defined condition, e.g. not-authorized, conflict, policy-violation.
    return err && typeof err === 'object' && typeof err.condition === 'string' ? err.condition : undefined;
}

function fail(err) {
    if (finished) return;
    const message = err instanceof Error ? `${err.name && err.name !== 'Error' ? err.name + ': ' : ''}${err.message}` : String(err);
    note(`FAIL in phase ${phase}: ${message}`);
    const out = { ok: false, mode: opts.mode, error: message, phase };
    const cond = errorCondition(err);
    if (cond) out.error_condition = cond;
    if (err && err.code) out.error_code = String(err.code);
    finish({ ...out, ...stats() }, 1);
}

process.on('uncaughtException', (e) => fail(e instanceof Error ? e : new Error(`uncaught exception: ${e}`)));
process.on('unhandledRejection', (e) => {
    if (finished) return; // e.g. a late rejection from a client we are tearing down
    fail(e instanceof Error ? e : new Error(`unhandled rejection: ${e}`));
});
for (const sig of ['SIGTERM', 'SIGINT']) process.on(sig, () => fail(new Error(`terminated by ${sig}`)));

/** Resolve when pred() is true, checking every stepMs, failing after limitMs. */
async function waitFor(pred, limitMs, what, stepMs = 50) {
    const deadline = Date.now() + limitMs;
    const maxSteps = Math.ceil(limitMs / stepMs) + 1;
    for (let i = 0; i < maxSteps && !finished; i++) {
        if (pred()) return true;
        if (Date.now() >= deadline) break;
        await delay(stepMs);
    }
    if (pred()) return true;
    throw new Error(`timed out after ${limitMs} ms waiting for ${what}`);
}

// ---------------------------------------------------------------------------
// Wiring TLS options and the local address into @xmpp/client (see the header)
// ---------------------------------------------------------------------------

function tlsOptions() {
    const o = {
        servername: opts.domain,
        rejectUnauthorized: !opts.insecure,
    };
    if (opts.ca) o.ca = opts.ca;
    return o;
}

function installTlsOptions() {
    const original = TlsSocketWrapper.prototype.connect;
    if (typeof original !== 'function' || original.__megaphonePatched) {
        throw new Error('@xmpp/tls/lib/Socket.js has no connect() to wrap: @xmpp/client layout changed?');
    }
    const patched = function connect(options, ...rest) {
        const extra = tlsOptions();
        // {socket} means STARTTLS (upgrade an existing TCP socket); otherwise XEP-0368
        // direct TLS, which should announce ALPN "xmpp-client".
        if (!options || !options.socket) extra.ALPNProtocols = ['xmpp-client'];
        const ret = original.call(this, { ...options, ...extra }, ...rest);
        // Node's TLS handshake has no timeout of its own: bound it by the step timeout.
        const sock = this.socket;
        if (sock && typeof sock.once === 'function') {
            const ms = opts.stepTimeoutMs;
            const timer = setTimeout(() => {
                if (sock.destroyed) return;
                const err = new Error(`TLS handshake not finished within --step-timeout-ms ${ms}`);
                err.code = 'ETLSHANDSHAKETIMEOUT';
                sock.destroy(err);
            }, ms);
            timer.unref();
            sock.once('secureConnect', () => clearTimeout(timer));
            sock.once('close', () => clearTimeout(timer));
        }
        return ret;
    };
    patched.__megaphonePatched = true;
    TlsSocketWrapper.prototype.connect = patched;
}

function installWebSocket() {
    const wsOptions = { handshakeTimeout: opts.stepTimeoutMs };
    if (opts.localAddress) wsOptions.localAddress = opts.localAddress;
    if (opts.service.startsWith('wss:')) Object.assign(wsOptions, tlsOptions());
    // @xmpp/websocket calls `new WebSocket(url, ["xmpp"])` and listens with
    // addEventListener (open/message/error/close), which ws supports.
    globalThis.WebSocket = class MegaphoneWebSocket extends WsWebSocket {
        constructor(url, protocols) {
            super(url, protocols, wsOptions);
        }
    };
}

/** The net.Socket / tls.TLSSocket under @xmpp/client's current socket, if any. */
function rawSocket(xmpp) {
    const s = xmpp.socket;
    if (!s) return null;
    if (s instanceof net.Socket) return s; // plain TCP (@xmpp/connection-tcp Socket)
    if (s instanceof TlsSocketWrapper) return s.socket; // direct TLS or after STARTTLS
    if (s.socket instanceof WsWebSocket) return s.socket._socket || null; // ws internals, for reporting only
    return null;
}

// ---------------------------------------------------------------------------
// Message bodies: numbered, with XML-special and non-ASCII text (incl. a
// non-BMP code point), tagged with a per-run id so leftovers from an earlier
// run (e.g. offline storage on the server) are recognised and ignored.
// ---------------------------------------------------------------------------

const RUN_ID = randomBytes(4).toString('hex');
const SPECIAL = `<&>"' ]]> ünïcödé 中文 🚀`;

function makeBody(fromSide, n) {
    return `${fromSide}->${fromSide === 'a' ? 'b' : 'a'} #${n} ${SPECIAL} run=${RUN_ID}`;
}

// ---------------------------------------------------------------------------
// One @xmpp/client connection
// ---------------------------------------------------------------------------

class Client {
    constructor(side, username, peerUsername) {
        this.side = side;
        this.username = username;
        this.peerBare = `${peerUsername}@${opts.domain}`;
        this.peerSide = side === 'a' ? 'b' : 'a';
        this.sent = 0;
        this.rx = { count: 0, expected: 1, stale: 0, unexpected: 0, lastAt: 0, maxGapMs: 0 };
        this.info = {};
        this.statusLog = [];
        this.errors = [];
        this.online = false;
        this.closing = false; // set while we log out on purpose
        this.socketClose = null; // {clean} from the 'disconnect' event (socket closed)
        this.starttlsOffered = null;
        this.sawProceed = false;
        this.tlsUpgraded = false; // TCP stream upgraded with STARTTLS (so far)
    }

    log(msg) {
        note(`[${this.side}] ${msg}`);
    }

    describe(msg) {
        // Error events seen so far, minus any that msg already quotes.
        const others = this.errors.filter((e) => !msg.includes(e.replace(/^\w+: /, '')));
        const errs = others.length ? `; errors=[${others.join(' | ')}]` : '';
        return `${msg}; statuses=[${this.statusLog.join(' ')}]${errs}`;
    }

    create() {
        const xmpp = client({
            service: opts.service,
            domain: opts.domain,
            username: this.username,
            password: opts.password,
            // Connection's step timeout (ms): stream open, STARTTLS answer, and each
            // of the two logout steps (</stream:stream> answer, socket close).
            // @xmpp/connection's default is 2000.
            timeout: opts.stepTimeoutMs,
        });
        this.xmpp = xmpp;

        // Fail fast: no automatic reconnect (it would reconnect 1 s after any
        // disconnect and, with stream management, try to resume the session).
        xmpp.reconnect.stop();

        // XEP-0198 (stream management): @xmpp/client enables it whenever the server
        // offers it (ejabberd's mod_stream_mgmt does). Its count of handled inbound
        // stanzas ('h', sent in <a/>) is wrong in 0.14.0 in two ways, and a low 'h'
        // makes the server believe its last stanzas were never handled: when the
        // session ends it bounces them (ejabberd: a message type="error" "User session
        // terminated" back to the sender of a message we DID receive). fixSmCounter()
        // corrects both; --sm off hides <sm/> from @xmpp/client instead.
        if (opts.sm === 'off') {
            xmpp.prependListener('element', (el) => {
                if (el.is('features', NS_STREAM)) el.children = el.children.filter((c) => c.name !== 'sm');
            });
        } else {
            this.fixSmCounter(xmpp);
        }

        // Bind outgoing TCP (and direct TLS) connections to --local-address.
        if (opts.localAddress) {
            const base = xmpp.socketParameters.bind(xmpp);
            xmpp.socketParameters = (service) => {
                const p = base(service);
                if (p && typeof p === 'object') p.localAddress = opts.localAddress;
                return p;
            };
        }

        // --starttls required: never authenticate on a stream that is not
        // encrypted. (@xmpp/client itself just skips STARTTLS when the server does
        // not offer it, and then picks a non-PLAIN SASL mechanism.)
        if (opts.starttls === 'required') {
            const send = xmpp.send.bind(xmpp);
            xmpp.send = (el, ...args) => {
                const isAuth = (el.name === 'auth' && el.attrs.xmlns === NS_SASL)
                    || (el.name === 'authenticate' && el.attrs.xmlns === NS_SASL2);
                if (isAuth && !(xmpp.socket instanceof TlsSocketWrapper)) {
                    return Promise.reject(new Error(`${this.side}: --starttls required but the stream was not upgraded `
                        + `(server ${this.starttlsOffered ? 'offered' : 'did not offer'} STARTTLS); refusing to authenticate`));
                }
                return send(el, ...args);
            };
        }

        xmpp.on('status', (status, arg) => {
            // After STARTTLS @xmpp/starttls attaches a TLS socket wrapper and reopens the stream.
            if (status === 'opening' && this.sawProceed && xmpp.socket instanceof TlsSocketWrapper) this.tlsUpgraded = true;
            let extra = '';
            if (arg && typeof arg === 'object' && 'clean' in arg) extra = arg.clean ? '(clean)' : '(dirty)';
            this.statusLog.push(status + extra);
            this.log(`status ${status}${extra ? ' ' + extra : ''}`);
        });
        xmpp.on('error', (err) => {
            const m = `${err.name || 'Error'}: ${err.message}`;
            this.errors.push(m);
            this.lastError = err;
            this.log(`error event: ${m}`);
            // Before 'online', start() rejects with this error; after it, any error is fatal.
            if (this.online && !this.closing) {
                const e = new Error(this.describe(`${this.side}: ${m}`));
                if (err.condition) e.condition = err.condition;
                fail(e);
            }
        });
        xmpp.on('disconnect', (arg) => {
            this.socketClose = arg || {};
            if (this.online && !this.closing) {
                const why = this.lastError ? ` after ${this.lastError.name}: ${this.lastError.message}` : '';
                const e = new Error(this.describe(`${this.side}: unexpectedly disconnected${why}`));
                if (this.lastError?.condition) e.condition = this.lastError.condition;
                fail(e);
            }
        });
        xmpp.on('nonza', (el) => {
            if (el.is('features', NS_STREAM) && !(xmpp.socket instanceof TlsSocketWrapper)
                && opts.transport === 'tcp' && this.starttlsOffered === null) {
                this.starttlsOffered = !!el.getChild('starttls', NS_TLS);
            }
            if (el.is('proceed', NS_TLS)) this.sawProceed = true;
        });
        xmpp.on('send', (el) => {
            if (el.name === 'auth' && el.attrs.xmlns === NS_SASL) this.info.sasl = el.attrs.mechanism;
            if (el.name === 'authenticate' && el.attrs.xmlns === NS_SASL2) this.info.sasl = `SASL2 ${el.attrs.mechanism}`;
        });
        xmpp.on('stanza', (st) => {
            if (st.is('message')) this.onMessage(st);
        });
        if (opts.debug) {
            xmpp.on('element', (el) => this.log(`RECV ${el.toString()}`));
            xmpp.on('send', (el) => this.log(`SEND ${el.toString()}`));
        }
        // XMPP ping (urn:xmpp:ping) is answered by @xmpp/client itself.
        return xmpp;
    }

    /**
     * Correct @xmpp/client 0.14.0's XEP-0198 inbound counter (sm.inbound = 'h'):
     *
     * 1. The counting middleware (@xmpp/stream-management) is registered after the
     *    IQ caller's (@xmpp/iq/caller.js), which consumes every IQ result/error that
     *    answers one of our requests (bind, ping, roster...) without calling next():
     *    those are never counted. We count them in an 'element' listener that runs
     *    before the middleware (prependListener), exactly when the IQ caller will
     *    consume them.
     * 2. The counter must start at 0 when <enabled/> is received, but the library
     *    resets it in an async continuation (after `await` of the enable procedure),
     *    i.e. after every stanza that arrived in the same read as <enabled/> has
     *    already been counted: those are lost. We count stanzas from <enabled/> on
     *    and, when the library performs its deferred reset to 0, set that count
     *    instead (an accessor on sm.inbound).
     */
    fixSmCounter(xmpp) {
        const sm = xmpp.streamManagement;
        const pending = xmpp.iqCaller?.handlers;
        if (!sm || typeof sm.inbound !== 'number' || !(pending instanceof Map)) {
            throw new Error('@xmpp/client layout changed: no streamManagement.inbound / iqCaller.handlers (see fixSmCounter)');
        }
        let inbound = sm.inbound;
        let sinceEnabled = null; // stanzas seen since <enabled/>, until the library resets the counter
        Object.defineProperty(sm, 'inbound', {
            configurable: true,
            enumerable: true,
            get: () => inbound,
            set: (v) => {
                if (v === 0 && sinceEnabled !== null) {
                    inbound = sinceEnabled;
                    sinceEnabled = null;
                } else {
                    inbound = v;
                }
            },
        });
        xmpp.on('disconnect', () => {
            sinceEnabled = null;
        });
        xmpp.prependListener('element', (el) => {
            if (el.is('enabled', NS_SM) || el.is('failed', NS_SM)) {
                sinceEnabled = el.name === 'enabled' ? 0 : null;
                return;
            }
            if (el.name !== 'iq' && el.name !== 'message' && el.name !== 'presence') return;
            if (sinceEnabled !== null) sinceEnabled++;
            if (el.name === 'iq' && (el.attrs.type === 'result' || el.attrs.type === 'error') && pending.has(el.attrs.id)) {
                sm.inbound += 1;
            }
        });
    }

    async connect() {
        const xmpp = this.create();
        let address;
        try {
            address = await xmpp.start();
        } catch (err) {
            // e.g. SASLError not-authorized (wrong password), StreamError <condition>,
            // a socket error (ECONNREFUSED, a certificate error), TimeoutError.
            let what = `${err?.name || 'Error'}: ${err?.message ?? err}`;
            if (err?.name === 'TimeoutError' && !err.message) {
                what = `TimeoutError: no answer from the server within --step-timeout-ms ${opts.stepTimeoutMs}`;
            }
            const e = new Error(this.describe(`${this.side} (${this.username}@${opts.domain}): login failed: ${what}`));
            if (err?.condition) e.condition = err.condition;
            if (err?.code) e.code = err.code;
            throw e;
        }
        this.online = true;
        this.jid = address.toString();

        // What was actually negotiated.
        const raw = rawSocket(xmpp);
        this.info.secure = xmpp.isSecure();
        this.info.localAddress = raw?.localAddress ?? null;
        if (opts.transport === 'tcp') {
            this.info.starttls = xmpp.socket instanceof TlsSocketWrapper && raw instanceof tls.TLSSocket;
            if (this.info.starttls && !this.sawProceed) throw new Error(`${this.side}: TLS socket without a STARTTLS <proceed/>?`);
        }
        if (raw instanceof tls.TLSSocket) {
            this.info.tls = {
                protocol: raw.getProtocol(),
                cipher: raw.getCipher()?.name ?? null,
                authorized: raw.authorized,
                authorization_error: raw.authorizationError ? String(raw.authorizationError) : null,
                alpn: raw.alpnProtocol || null,
            };
        }
        this.log(`online as ${this.jid} transport=${opts.transport} starttls=${this.info.starttls ?? '-'} `
            + `secure=${this.info.secure} sasl=${this.info.sasl} local=${this.info.localAddress}`
            + (this.info.tls ? ` tls=${this.info.tls.protocol}/${this.info.tls.cipher} authorized=${this.info.tls.authorized}` : ''));
        if (opts.starttls === 'required' && !this.info.starttls) {
            throw new Error(`${this.side}: --starttls required but the TCP stream was not upgraded`);
        }
    }

    onMessage(st) {
        try {
            const from = st.attrs.from || '';
            const type = st.attrs.type || 'normal';
            if (type === 'error') {
                fail(new Error(`${this.side}: received message error: ${st.toString().slice(0, 500)}`));
                return;
            }
            const body = st.getChildText('body');
            if (body === null) return; // chat states etc.
            if (!body.endsWith(` run=${RUN_ID}`)) {
                this.rx.stale++;
                this.log(`ignoring message from an earlier run: from=${from} body=${JSON.stringify(body.slice(0, 80))}`);
                return;
            }
            if (from.split('/')[0] !== this.peerBare) {
                this.rx.unexpected++;
                fail(new Error(`${this.side}: unexpected message (not from ${this.peerBare}): ${st.toString().slice(0, 400)}`));
                return;
            }
            const m = /#(\d+) /.exec(body);
            const n = m ? Number(m[1]) : NaN;
            const want = makeBody(this.peerSide, n);
            if (body !== want) {
                fail(new Error(`${this.side}: body not byte-exact: got ${JSON.stringify(body)} want ${JSON.stringify(want)}`));
                return;
            }
            if (n === this.rx.expected) {
                const now = Date.now();
                if (this.rx.lastAt) this.rx.maxGapMs = Math.max(this.rx.maxGapMs, now - this.rx.lastAt);
                this.rx.lastAt = now;
                this.rx.expected++;
                this.rx.count++;
            } else if (n < this.rx.expected) {
                fail(new Error(`${this.side}: duplicate message #${n} (next expected #${this.rx.expected})`));
            } else {
                fail(new Error(`${this.side}: message #${n} arrived but #${this.rx.expected} is missing (gap or out of order)`));
            }
        } catch (e) {
            fail(new Error(`${this.side}: message handler error: ${e.message}`));
        }
    }

    async sendChat(n) {
        // To the peer's full (bound) JID by default, as bosh_chat.mjs does (a bare
        // JID fans out to stale sessions of the account too); --address bare tests
        // bare-JID routing.
        const to = opts.address === 'bare' ? this.peerBare : this.peer.jid;
        this.sent++;
        await this.xmpp.send(xml('message', { to, type: 'chat', id: `${RUN_ID}-${this.side}-${n}` },
            xml('body', {}, makeBody(this.side, n))));
    }

    /** Initial presence, then a ping round trip so the server has processed it. */
    async goOnline() {
        await this.xmpp.send(xml('presence'));
        try {
            await this.xmpp.iqCaller.request(
                xml('iq', { type: 'get', to: opts.domain }, xml('ping', { xmlns: NS_PING })), 15000);
        } catch (e) {
            // A server without mod_ping answers with an error IQ: still a round trip.
            if (e.name !== 'StanzaError') throw new Error(`${this.side}: presence barrier ping: ${e.name}: ${e.message}`);
        }
        // XEP-0198 is enabled right after resource binding, i.e. after 'online'.
        this.info.sm = !!this.xmpp.streamManagement?.enabled;
    }

    async roster() {
        let res;
        try {
            res = await this.xmpp.iqCaller.request(xml('iq', { type: 'get' }, xml('query', { xmlns: NS_ROSTER })), 15000);
        } catch (e) {
            const err = new Error(`${this.side}: roster get failed: ${e.name}: ${e.message}`);
            if (e.condition) err.condition = e.condition;
            throw err;
        }
        if (res.attrs.type !== 'result') throw new Error(`${this.side}: roster get: not a result: ${res.toString().slice(0, 300)}`);
        const q = res.getChild('query', NS_ROSTER);
        if (!q) throw new Error(`${this.side}: roster result has no jabber:iq:roster query`);
        return q.getChildren('item').length;
    }

    async logout() {
        this.closing = true;
        this.info.sm = !!this.xmpp.streamManagement?.enabled;
        // stop(): (a final XEP-0198 <a/> if enabled), </stream:stream> (RFC 7395:
        // <close/>), wait for the server's own closing tag, then end the socket and
        // wait for it to close; each wait bounded by the step timeout. Timeouts are
        // not thrown. stop() resolves with the server's closing element (the
        // <stream:stream> root, or <close/>) or with undefined when the server did
        // not close the stream in time. NB: the 'close' status event cannot tell:
        // @xmpp/connection passes the closing element as its "dirty" argument, so it
        // always says clean: false.
        const el = await within(this.xmpp.stop(), 3 * opts.stepTimeoutMs + 1000, `${this.side} stop()`);
        const streamClosed = !!(el && typeof el === 'object' && el.name);
        // Informational only: over TLS the server may close the TCP connection right
        // after its </stream:stream>, before our own TLS close_notify/FIN arrives,
        // and Node then reports ECONNRESET (a "dirty" socket close) now and then.
        this.info.socketCloseClean = this.socketClose?.clean === true;
        if (!streamClosed || this.xmpp.status !== 'offline') {
            throw new Error(this.describe(`${this.side}: logout was not clean (server closed the stream: ${streamClosed}, `
                + `status ${this.xmpp.status})`));
        }
        if (!this.info.socketCloseClean) this.log('logout: stream closed cleanly, but the socket close was not clean (ignored)');
    }
}

// ---------------------------------------------------------------------------
// Modes
// ---------------------------------------------------------------------------

async function loginBoth() {
    phase = 'login';
    clients.a = new Client('a', opts.a, opts.b);
    clients.b = new Client('b', opts.b, opts.a);
    clients.a.peer = clients.b;
    clients.b.peer = clients.a;
    await Promise.all([clients.a.connect(), clients.b.connect()]);
    note(`logged in: a=${clients.a.jid} b=${clients.b.jid}`);
    phase = 'presence';
    await Promise.all([clients.a.goOnline(), clients.b.goOnline()]);
}

async function rosterAndLogout() {
    phase = 'roster';
    const [ra, rb] = await Promise.all([clients.a.roster(), clients.b.roster()]);
    note(`roster sizes: a=${ra} b=${rb}`);
    phase = 'logout';
    await Promise.all([clients.a.logout(), clients.b.logout()]);
    note('both logged out');
    return { a: ra, b: rb };
}

async function sendPaced(c, count, paceMs) {
    for (let n = 1; n <= count && !finished; n++) {
        await c.sendChat(n);
        if (paceMs > 0) await delay(paceMs);
    }
}

async function runChat() {
    await loginBoth();
    phase = 'exchange';
    const { a, b } = clients;
    note(`sending ${opts.count} messages each way`);
    await Promise.all([sendPaced(a, opts.count, opts.paceMs), sendPaced(b, opts.count, opts.paceMs)]);
    const budget = Math.max(1000, opts.timeout * 1000 - elapsed());
    await waitFor(() => a.rx.count >= opts.count && b.rx.count >= opts.count, budget,
        `all messages (a got ${a.rx.count}/${opts.count}, b got ${b.rx.count}/${opts.count})`);
    // Give a duplicate that might trail the last message a moment to show up.
    await delay(300);
    const roster = await rosterAndLogout();
    if (!finished) finish({ ok: true, mode: 'chat', ...stats(), roster }, 0);
}

async function runLive() {
    await loginBoth();
    phase = 'live';
    process.stdout.write('READY\n');
    const { a, b } = clients;
    const total = Math.max(1, Math.floor((opts.duration * 1000) / opts.intervalMs));
    note(`READY; a sends ${total} messages to b, one every ${opts.intervalMs} ms`);
    const start = Date.now();
    for (let n = 1; n <= total && !finished; n++) {
        const due = start + (n - 1) * opts.intervalMs;
        const now = Date.now();
        if (due > now) await delay(due - now);
        if (finished) return;
        await a.sendChat(n);
        if (n % Math.max(1, Math.round(5000 / opts.intervalMs)) === 0) {
            note(`live: sent ${n}/${total}, b received ${b.rx.count}`);
        }
    }
    phase = 'settle';
    note(`live: all ${total} sent; waiting up to ${opts.settle} s for b to receive them (has ${b.rx.count})`);
    await waitFor(() => b.rx.count >= total, opts.settle * 1000,
        `stragglers: b received ${b.rx.count}/${total} within ${opts.settle} s after the last send`);
    await delay(300);
    const roster = await rosterAndLogout();
    if (!finished) finish({ ok: true, mode: 'live', ...stats(), roster, max_gap_ms: { b: b.rx.maxGapMs } }, 0);
}

// ---------------------------------------------------------------------------

async function main() {
    try {
        opts = parseCli(process.argv.slice(2));
    } catch (e) {
        fail(new Error(`bad arguments: ${e.message}`));
        return;
    }
    installTlsOptions();
    installWebSocket();
    const timer = setTimeout(() => {
        const extra = perSide((c) => c.describe(c.side));
        fail(new Error(`overall timeout of ${opts.timeout} s exceeded in phase ${phase} (${Object.values(extra).join(' | ')})`));
    }, opts.timeout * 1000);
    note(`mode=${opts.mode} service=${opts.service} transport=${opts.transport} domain=${opts.domain} a=${opts.a} b=${opts.b} `
        + `run=${RUN_ID} timeout=${opts.timeout}s starttls=${opts.starttls} insecure=${opts.insecure}`
        + (opts.localAddress ? ` local-address=${opts.localAddress}` : ''));
    if (opts.mode === 'chat') await runChat();
    else await runLive();
}

main().catch(fail);
