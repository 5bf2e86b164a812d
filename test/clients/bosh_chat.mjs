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
import { Strophe, useLocalAddress } from './node-env.mjs';
import {
    Run, RUN_ID, chatOptionSpecs, chatOptions, chatTimeout, parseCommandLine, loginBoth, runChat, runLive,
} from './common.mjs';
import { StropheClient, STROPHE_OPTION_SPECS, stropheOptions } from './strophe_client.mjs';

// ---------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------

const USAGE = `usage: node bosh_chat.mjs --url http://127.0.0.1:PORT/bosh --a alice@localhost --b bob@localhost
         [--password PW | env DEMO_PASSWORD] [--mode chat|live] [--count 100]
         [--duration SECONDS] [--interval-ms 200] [--settle SECONDS] [--until-signal]
         [--timeout SECONDS] [--wait SECONDS] [--max-retries N] [--pace-ms MS]
         [--address full|bare] [--tolerate-unexpected] [--local-address 127.x.y.z] [--debug] [--strophe-log debug|info|warn|error|fatal]
         [--flush-every N]`;

function parseCli(argv) {
    const values = parseCommandLine(argv, {
        url: { type: 'string' },
        ...chatOptionSpecs(5),
        ...STROPHE_OPTION_SPECS,
    }, USAGE);
    for (const k of ['url', 'a', 'b']) {
        if (!values[k]) throw new Error(`--${k} is required\n${USAGE}`);
    }
    // http(s): BOSH; ws(s): Strophe's WebSocket transport (RFC 7395).
    if (!/^(https?|wss?):\/\//.test(values.url)) throw new Error('--url must be an http(s) or ws(s) URL');
    const opts = {
        url: values.url,
        a: values.a,
        b: values.b,
        ...chatOptions(values),
        ...stropheOptions(values),
    };
    opts.timeout = chatTimeout(values, opts);
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
    // Every BOSH request leaves from --local-address.
    if (opts.localAddress !== undefined) useLocalAddress(opts.localAddress);
    Strophe.setLogLevel(opts.stropheLog);
    run.startTimer(opts.timeout);
    run.note(`mode=${opts.mode} url=${opts.url} a=${opts.a} b=${opts.b} run=${RUN_ID} timeout=${opts.timeout}s wait=${opts.wait}s maxRetries=${opts.maxRetries}`);
    await loginBoth(run, new StropheClient(run, opts, 'a', opts.a, opts.b), new StropheClient(run, opts, 'b', opts.b, opts.a));
    if (opts.mode === 'chat') await runChat(run);
    else await runLive(run);
}

main().catch(fail);
