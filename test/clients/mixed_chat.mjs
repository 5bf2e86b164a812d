#!/usr/bin/env node
// Two different real clients talking to each other, for Megaphone's integration
// tests: a (e.g. alice) is Strophe.js 5 over BOSH, b (e.g. bob) is @xmpp/client
// 0.14 over XMPP/TCP with STARTTLS, direct TLS (XEP-0368) or WebSocket (RFC 7395).
//
// Both log in, then (chat mode) a sends --count messages to b and b --count to a
// (numbered, XML-special and non-ASCII bodies), each side checks exactly-once,
// in-order, byte-exact receipt; then a roster get on each side and a clean
// logout. Live mode (a -> b at an interval, READY on stdout) works as in the
// other scripts. The result is one JSON line on stdout ({"ok":true,...} + exit 0,
// or {"ok":false,"error":...} + exit 1); progress and --debug traffic go to
// stderr. See README.md.
//
// The clients are the ones bosh_chat.mjs (StropheClient, strophe_client.mjs) and
// xmpp_chat.mjs (XmppClient, xmpp_client.mjs) use, with the same options and the
// same Node wiring (node-env.mjs for Strophe; TLS options, --insecure and
// --local-address for @xmpp/client as described in xmpp_chat.mjs); the run, the
// bodies, the checks and the modes are common.mjs.

import './console-to-stderr.mjs'; // must stay first
import { Strophe, useLocalAddress } from './node-env.mjs';
import {
    Run, RUN_ID, chatOptionSpecs, chatOptions, chatTimeout, parseCommandLine, loginBoth, runChat, runLive,
} from './common.mjs';
import { StropheClient, STROPHE_OPTION_SPECS, stropheOptions } from './strophe_client.mjs';
import {
    XmppClient, XMPP_OPTION_SPECS, xmppOptions, xmppAccounts, installTlsOptions, installWebSocket,
} from './xmpp_client.mjs';

// ---------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------

const USAGE = `usage: node mixed_chat.mjs --bosh-url http://127.0.0.1:PORT/bosh
         --service xmpp://127.0.0.1:PORT|xmpps://127.0.0.1:PORT|ws://127.0.0.1:PORT/ws
         --domain localhost --a alice --b bob [--password PW | env DEMO_PASSWORD]
         [--mode chat|live] [--count 100] [--pace-ms 5] [--duration SECONDS] [--interval-ms 200]
         [--settle SECONDS] [--until-signal] [--timeout SECONDS] [--address full|bare] [--local-address 127.x.y.z] [--debug]
         a (Strophe.js, BOSH):    [--wait SECONDS] [--max-retries N] [--tolerate-unexpected]
                                  [--strophe-log debug|info|warn|error|fatal] [--flush-every N]
         b (@xmpp/client, XMPP):  [--step-timeout-ms 10000] [--starttls required|optional]
                                  [--insecure] [--ca FILE.pem] [--sm auto|off]`;

function parseCli(argv) {
    const values = parseCommandLine(argv, {
        'bosh-url': { type: 'string' },
        ...XMPP_OPTION_SPECS,
        ...chatOptionSpecs(5),
        ...STROPHE_OPTION_SPECS,
    }, USAGE);
    for (const k of ['bosh-url', 'service', 'a', 'b']) {
        if (!values[k]) throw new Error(`--${k} is required\n${USAGE}`);
    }
    if (!/^https?:\/\//.test(values['bosh-url'])) throw new Error('--bosh-url must be an http(s) URL');
    const opts = {
        url: values['bosh-url'], // what StropheClient connects to
        ...xmppOptions(values),
        ...xmppAccounts(values),
        ...chatOptions(values),
        ...stropheOptions(values),
    };
    opts.timeout = chatTimeout(values, opts);
    return opts;
}

// ---------------------------------------------------------------------------
// Result line
// ---------------------------------------------------------------------------

const run = new Run('mixed_chat');
const perSide = (fn) => run.perSide(fn);
/** fn(c) for b, the @xmpp/client side, as {b: ...} (empty before b exists). */
const xmppSide = (fn) => (run.clients.b ? { b: fn(run.clients.b) } : {});

run.stats = () => {
    const { opts } = run;
    const b = run.clients.b;
    const bSecure = b?.info.secure ?? null;
    return {
        // What b's XMPP stream was carried over (a is always BOSH): tcp, tls or websocket.
        transport: opts.transport,
        transports: { a: 'bosh', b: opts.transport },
        bosh_url: opts.url,
        service: opts.service,
        // As in xmpp_chat.mjs, for b: STARTTLS offered and used (xmpp:// only, else null).
        starttls: opts.transport === 'tcp' && b ? (b.info.starttls ?? b.tlsUpgraded) : null,
        starttls_offered: opts.transport === 'tcp' && b ? b.starttlsOffered : null,
        // b's stream as @xmpp/client sees it (Connection#isSecure: TLS, or ws:// to
        // loopback). a's BOSH is secure when its URL is https (by_side.secure.a).
        secure: bSecure,
        by_side: {
            secure: { ...(run.clients.a ? { a: /^https:/.test(opts.url) } : {}), ...(b ? { b: bSecure } : {}) },
        },
        tls: xmppSide((c) => c.info.tls ?? null),
        sasl: xmppSide((c) => c.info.sasl ?? null),
        sm: xmppSide((c) => c.info.sm ?? null),
        local_address: xmppSide((c) => c.info.localAddress ?? null),
        sent: perSide((c) => c.sent),
        received: perSide((c) => c.rx.count),
        http_errors: run.clients.a ? { a: run.clients.a.httpErrors } : {},
        stale_ignored: perSide((c) => c.rx.stale),
        unexpected: perSide((c) => c.rx.unexpected),
        jids: perSide((c) => c.jid || null),
        elapsed_ms: run.elapsed(),
    };
};

const fail = (err) => run.fail(err);
process.on('uncaughtException', (e) => fail(e instanceof Error ? e : new Error(`uncaught exception: ${e}`)));
process.on('unhandledRejection', (e) => {
    if (run.finished) return; // e.g. a late rejection from a client we are tearing down
    fail(e instanceof Error ? e : new Error(`unhandled rejection: ${e}`));
});
for (const sig of ['SIGTERM', 'SIGINT']) process.on(sig, () => fail(new Error(`terminated by ${sig}`)));

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
    if (opts.localAddress !== undefined) useLocalAddress(opts.localAddress);
    Strophe.setLogLevel(opts.stropheLog);
    installTlsOptions(opts);
    installWebSocket(opts); // after node-env.mjs: replaces the WebSocket global Strophe installed (a uses BOSH)
    run.startTimer(opts.timeout);
    run.note(`mode=${opts.mode} a=${opts.a}@${opts.domain} over BOSH ${opts.url}, b=${opts.b}@${opts.domain} over `
        + `${opts.transport} ${opts.service} run=${RUN_ID} timeout=${opts.timeout}s starttls=${opts.starttls} `
        + `insecure=${opts.insecure}` + (opts.localAddress ? ` local-address=${opts.localAddress}` : ''));
    const aJid = `${opts.a}@${opts.domain}`;
    const bJid = `${opts.b}@${opts.domain}`;
    await loginBoth(run,
        new StropheClient(run, opts, 'a', aJid, bJid),
        new XmppClient(run, opts, 'b', opts.b, aJid));
    if (opts.mode === 'chat') await runChat(run);
    else await runLive(run);
}

main().catch(fail);
