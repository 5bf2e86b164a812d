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
//                   --drop-at S: S seconds after READY, one side's connection
//                   (--drop-side, default b, the receiver) is dropped abruptly;
//                   @xmpp/client reconnects and resumes the XEP-0198 session, and
//                   the in-order, gap-free, duplicate-free check runs across the
//                   drop. The result says "resumed"; a fresh login instead of a
//                   resumption fails the run (see xmpp_client.mjs dropConnection()).
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
//    once, instead of a silent reconnect one second later. With --drop-at it is
//    turned on for the dropped side only, from the drop until the resumption.
//
// The client itself is XmppClient (xmpp_client.mjs); the run, the bodies, the
// checks and the modes are shared with bosh_chat.mjs and mixed_chat.mjs
// (common.mjs).

import './console-to-stderr.mjs'; // must stay first
import {
    Run, RUN_ID, numberOption, chatOptionSpecs, chatOptions, chatTimeout, parseCommandLine, loginBoth, runChat, runLive,
} from './common.mjs';
import {
    XmppClient, XMPP_OPTION_SPECS, xmppOptions, xmppAccounts, installTlsOptions, installWebSocket,
} from './xmpp_client.mjs';

// ---------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------

const USAGE = `usage: node xmpp_chat.mjs --service xmpp://127.0.0.1:PORT|xmpps://127.0.0.1:PORT|ws://127.0.0.1:PORT/ws
         --domain localhost --a alice --b bob [--password PW | env DEMO_PASSWORD]
         [--mode chat|live] [--count 100] [--pace-ms 0] [--duration SECONDS] [--interval-ms 200]
         [--settle SECONDS] [--until-signal] [--timeout SECONDS] [--step-timeout-ms 10000]
         [--starttls required|optional] [--insecure] [--ca FILE.pem]
         [--address full|bare] [--sm auto|off] [--local-address 127.x.y.z] [--debug]
         [--drop-at SECONDS [--drop-side a|b]]   (live mode: drop a connection, resume it)`;

function parseCli(argv) {
    const values = parseCommandLine(argv, {
        ...XMPP_OPTION_SPECS,
        ...chatOptionSpecs(0),
        'drop-at': { type: 'string' },
        'drop-side': { type: 'string' },
    }, USAGE);
    for (const k of ['service', 'a', 'b']) {
        if (!values[k]) throw new Error(`--${k} is required\n${USAGE}`);
    }
    const opts = {
        ...xmppOptions(values),
        ...xmppAccounts(values),
        ...chatOptions(values),
    };
    if (values['drop-at'] !== undefined) {
        if (opts.mode !== 'live') throw new Error('--drop-at needs --mode live');
        if (opts.sm === 'off') throw new Error('--drop-at needs stream management (not --sm off)');
        opts.dropAt = numberOption(values, 'drop-at', 0, 3600);
        if (opts.dropAt >= opts.duration) throw new Error(`--drop-at must be less than --duration ${opts.duration}`);
        opts.dropSide = values['drop-side'] ?? 'b';
        if (!['a', 'b'].includes(opts.dropSide)) throw new Error(`--drop-side must be a or b, got ${opts.dropSide}`);
    } else if (values['drop-side'] !== undefined) {
        throw new Error('--drop-side needs --drop-at');
    }
    opts.timeout = chatTimeout(values, opts);
    return opts;
}

// ---------------------------------------------------------------------------
// Result line: the counters every result carries (see README.md)
// ---------------------------------------------------------------------------

const run = new Run('xmpp_chat');
const perSide = (fn) => run.perSide(fn);

/**
 * One boolean for both sides, so the JSON field always has the same type: null
 * while no side knows yet, otherwise `every` (or `some`) over the sides that do.
 */
function allSides(fn, how = 'every') {
    const vals = Object.values(perSide(fn)).filter((v) => v !== null && v !== undefined);
    if (vals.length === 0) return null;
    return how === 'some' ? vals.some(Boolean) : vals.every(Boolean);
}

run.stats = () => {
    const { opts } = run;
    const out = {
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
        elapsed_ms: run.elapsed(),
    };
    if (opts.dropAt !== undefined) {
        // --drop-at: was the dropped side's XEP-0198 session resumed (<resumed/>)?
        const d = run.clients[opts.dropSide]?.drop ?? null;
        out.resumed = !!d?.resumed;
        out.drop = d;
    }
    return out;
};

const fail = (err) => run.fail(err);
process.on('uncaughtException', (e) => fail(e instanceof Error ? e : new Error(`uncaught exception: ${e}`)));
process.on('unhandledRejection', (e) => {
    if (run.finished) return; // e.g. a late rejection from a client we are tearing down
    fail(e instanceof Error ? e : new Error(`unhandled rejection: ${e}`));
});
for (const sig of ['SIGTERM', 'SIGINT']) process.on(sig, () => fail(new Error(`terminated by ${sig}`)));

/** runLive hooks for --drop-at: drop one side, hold a's sends while a is down, insist on resumption. */
function dropHooks(opts) {
    const side = () => run.clients[opts.dropSide];
    const { a } = run.clients;
    let dropDue = 0;
    return {
        start() {
            run.note(`live: dropping ${opts.dropSide}'s connection ${opts.dropAt} s from now`);
            dropDue = Date.now() + opts.dropAt * 1000;
            setTimeout(() => {
                if (!run.finished) side().dropConnection();
            }, opts.dropAt * 1000);
        },
        async beforeSend() {
            if (a.dropping) await a.waitResumed();
        },
        async settled() {
            const c = side();
            // A drop scheduled after the last send may still be ahead.
            await run.waitFor(() => c.drop !== null, Math.max(0, dropDue - Date.now()) + 2000,
                `${c.side}'s connection drop at ${opts.dropAt} s`);
            if (c.dropping) await c.waitResumed();
            if (!c.drop.resumed) throw new Error(c.describe(`${c.side}: the session was not resumed`));
        },
    };
}

// ---------------------------------------------------------------------------

async function main() {
    let opts;
    try {
        opts = parseCli(process.argv.slice(2));
    } catch (e) {
        fail(new Error(`bad arguments: ${e.message}`));
        return;
    }
    run.opts = opts;
    installTlsOptions(opts);
    installWebSocket(opts);
    run.startTimer(opts.timeout);
    run.note(`mode=${opts.mode} service=${opts.service} transport=${opts.transport} domain=${opts.domain} a=${opts.a} b=${opts.b} `
        + `run=${RUN_ID} timeout=${opts.timeout}s starttls=${opts.starttls} insecure=${opts.insecure}`
        + (opts.localAddress ? ` local-address=${opts.localAddress}` : '')
        + (opts.dropAt !== undefined ? ` drop-at=${opts.dropAt}s drop-side=${opts.dropSide}` : ''));
    await loginBoth(run,
        new XmppClient(run, opts, 'a', opts.a, `${opts.b}@${opts.domain}`),
        new XmppClient(run, opts, 'b', opts.b, `${opts.a}@${opts.domain}`));
    if (opts.mode === 'chat') await runChat(run);
    else await runLive(run, opts.dropAt !== undefined ? dropHooks(opts) : {});
}

main().catch(fail);
