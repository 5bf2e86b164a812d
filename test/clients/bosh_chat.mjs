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
import { randomBytes } from 'node:crypto';
import { Strophe, $iq, $msg, $pres, useLocalAddress } from './node-env.mjs';

const NS_PING = 'urn:xmpp:ping';
const NS_ROSTER = 'jabber:iq:roster';

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
    const num = (name, min, max) => {
        const v = Number(values[name]);
        if (!Number.isFinite(v) || v < min || v > max) {
            throw new Error(`--${name} must be a number in [${min}, ${max}], got ${JSON.stringify(values[name])}`);
        }
        return v;
    };
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
// Result / failure plumbing
// ---------------------------------------------------------------------------

const t0 = Date.now();
const elapsed = () => Date.now() - t0;
let opts = { mode: 'chat' };
let phase = 'init';
let finished = false;
const clients = {};

function note(msg) {
    process.stderr.write(`[bosh_chat +${(elapsed() / 1000).toFixed(3)}s] ${msg}\n`);
}

function perSide(fn) {
    const out = {};
    for (const k of ['a', 'b']) if (clients[k]) out[k] = fn(clients[k]);
    return out;
}

function stats() {
    return {
        sent: perSide((c) => c.sent),
        received: perSide((c) => c.rx.count),
        http_errors: perSide((c) => c.httpErrors),
        stale_ignored: perSide((c) => c.rx.stale),
        unexpected: perSide((c) => c.rx.unexpected),
        jids: perSide((c) => c.conn?.jid || null),
        elapsed_ms: elapsed(),
    };
}

async function finish(obj, code) {
    if (finished) return;
    finished = true;
    // On failure, log out whatever is still connected (bounded to ~2 s) so that
    // no half-dead BOSH session of ours lingers on the server until its
    // inactivity timeout: such sessions keep receiving stanzas and ejabberd
    // re-routes their undelivered stanzas when they expire, which would disturb
    // the next run.
    const open = Object.values(clients).filter((c) => c.conn && c.connected && !c.disconnected);
    for (const c of Object.values(clients)) c.closing = true;
    if (open.length) {
        for (const c of open) {
            try {
                c.conn.disconnect('aborting');
            } catch (e) {
                note(`[${c.side}] disconnect during cleanup threw: ${e.message}`);
            }
        }
        for (let i = 0; i < 40 && open.some((c) => !c.disconnected); i++) await delay(50);
        note(`cleanup: ${open.filter((c) => c.disconnected).length}/${open.length} connection(s) logged out`);
    }
    process.stdout.write(JSON.stringify(obj) + '\n', () => process.exit(code));
    // Belt and braces: never hang after the result is out.
    setTimeout(() => process.exit(code), 2000).unref();
}

function fail(err) {
    const message = err instanceof Error ? err.message : String(err);
    note(`FAIL in phase ${phase}: ${message}`);
    finish({ ok: false, mode: opts.mode, error: message, phase, ...stats() }, 1);
}

process.on('uncaughtException', (e) => fail(`uncaught exception: ${e && e.stack ? e.stack : e}`));
process.on('unhandledRejection', (e) => fail(`unhandled rejection: ${e && e.stack ? e.stack : e}`));
// Killed by the test harness: still report, and log out what we can (bounded).
for (const sig of ['SIGTERM', 'SIGINT']) process.on(sig, () => fail(`terminated by ${sig}`));

const delay = (ms) => new Promise((r) => setTimeout(r, ms));

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
// One Strophe BOSH connection
// ---------------------------------------------------------------------------

const STATUS_NAME = Object.fromEntries(Object.entries(Strophe.Status).map(([k, v]) => [v, k]));

class Client {
    constructor(side, jid, peerJid) {
        this.side = side;
        this.jidArg = jid;
        this.peerBare = Strophe.getBareJidFromJid(peerJid);
        this.peerSide = side === 'a' ? 'b' : 'a';
        this.sent = 0;
        this.rx = { count: 0, expected: 1, stale: 0, unexpected: 0, lastAt: 0, maxGapMs: 0 };
        this.httpErrors = {};
        this.statusLog = [];
        this.connected = false;
        this.disconnected = false;
        this.closing = false; // set while we log out on purpose
        this.sawConnTimeout = false;
    }

    log(msg) {
        note(`[${this.side}] ${msg}`);
    }

    connect() {
        const conn = new Strophe.Connection(opts.url);
        this.conn = conn;

        // --- Retry policy (what lets a session ride through a short server restart) ---
        //
        // From node_modules/strophe.js/src/transports/bosh.ts (Strophe 5.0.0):
        //  * _onRequestStateChange(): an HTTP status of 0 (connection refused/reset,
        //    i.e. any network error) or 5xx is a *retryable* error: the request is
        //    kept in the queue, _hitError() bumps a per-connection error counter and
        //    _processRequest() re-sends the SAME rid and payload.  A 4xx is fatal:
        //    Strophe disconnects at once (so e.g. 404 "unknown sid" after a restart
        //    ends the session).  Any 200 resets the error counter to 0.
        //  * _hitError(): when the counter exceeds 4 (5 consecutive errors, counted
        //    across all in-flight requests, not per request) Strophe gives up:
        //    CONNTIMEOUT then DISCONNECTED.  This limit is hard-coded.
        //  * _processRequest(): re-send backoff, by the request's send count:
        //    1st and 2nd send immediately, then min(floor(1.1*wait), sends^3) s,
        //    i.e. 8 s, 27 s, ... (capped at floor(1.1*wait)).  If a request has
        //    been sent more than conn.maxRetries times the connection is dropped.
        //  * Strophe keeps at most 2 requests in flight (hold=1 + one to send).
        //
        // So a ~1-2 s outage costs at most 2 requests x 2 immediate failures = 4
        // errors (the limit is 5), then both requests wait 8 s and succeed against
        // the restarted server, which resets the counter.  Hence:
        //  * wait (--wait, default 60 = Strophe's default): must stay >= 8 s so the
        //    third attempt is 8 s out (backoff is capped at floor(1.1*wait)); a
        //    shorter wait makes the third attempt come sooner and can burn the 5th
        //    error while the server is still down.
        //  * maxRetries (--max-retries, default 5 = Strophe's default): only limits
        //    how often ONE request is re-sent; with the schedule above the error
        //    counter (5) is hit first, so 5 never cuts a 1-2 s outage short.  Values
        //    below 3 would (the request that rides out the outage is on its 3rd send).
        //  * Bosh timeout multipliers are left at 1.1 / 0.1: lowering the primary one
        //    to shorten the backoff would also abort every held long-poll early.
        // The expected recovery time after a 1-2 s outage is therefore ~8 s; the live
        // mode's --settle (10 s) covers stragglers sent near the end.
        conn.maxRetries = opts.maxRetries;

        // Observe (not change) HTTP-level errors so the report shows the outage.
        const onHttpError = (status) => {
            this.httpErrors[status] = (this.httpErrors[status] || 0) + 1;
            this.lastHttpError = { status, at_ms: elapsed() };
            this.log(`HTTP error status ${status} (Strophe error count ${conn._proto?.errors})`);
        };
        conn.addProtocolErrorHandler('HTTP', 0, onHttpError);
        for (let s = 400; s <= 599; s++) conn.addProtocolErrorHandler('HTTP', s, onHttpError);

        if (opts.debug) {
            conn.xmlOutput = (el) => this.log(`SEND ${Strophe.serialize(el)}`);
            conn.xmlInput = (el) => this.log(`RECV ${Strophe.serialize(el)}`);
        }

        return new Promise((resolve, reject) => {
            conn.connect(
                this.jidArg,
                opts.password,
                (status, condition) => this.onStatus(status, condition, resolve, reject),
                opts.wait,
                1,
            );
        });
    }

    onStatus(status, condition, resolve, reject) {
        const name = STATUS_NAME[status] || String(status);
        this.statusLog.push(condition ? `${name}(${condition})` : name);
        this.log(`status ${name}${condition ? ' (' + condition + ')' : ''}`);
        const S = Strophe.Status;
        switch (status) {
            case S.CONNECTED:
                this.connected = true;
                resolve();
                return;
            case S.AUTHFAIL:
                reject(new Error(`${this.side}: authentication failed for ${this.jidArg}${condition ? ' (' + condition + ')' : ''}`));
                return;
            case S.CONNFAIL:
            case S.ERROR:
                this.error = `${this.side}: Strophe ${name}${condition ? ' (' + condition + ')' : ''}`;
                if (!this.connected) reject(new Error(this.error));
                else if (!this.closing) fail(this.describe(this.error));
                return;
            case S.CONNTIMEOUT:
                this.sawConnTimeout = true;
                if (!this.closing) {
                    this.error = `${this.side}: Strophe CONNTIMEOUT (gave up after repeated HTTP errors)`;
                }
                return;
            case S.DISCONNECTED:
                this.disconnected = true;
                if (!this.connected) {
                    reject(new Error(this.describe(`${this.side}: disconnected before login completed`)));
                } else if (!this.closing) {
                    fail(this.describe(this.error || `${this.side}: unexpectedly DISCONNECTED`));
                }
                return;
            default:
                return;
        }
    }

    describe(msg) {
        const errs = Object.entries(this.httpErrors).map(([s, n]) => `${s}x${n}`).join(',');
        return `${msg}; statuses=[${this.statusLog.join(' ')}]` + (errs ? `; http_errors=${errs}` : '');
    }

    installHandlers() {
        const conn = this.conn;
        conn.addHandler((st) => this.onMessage(st), null, 'message', null, null, null);
        // Answer XMPP pings like a real client would.
        conn.addHandler(
            (iq) => {
                conn.send($iq({ type: 'result', to: iq.getAttribute('from'), id: iq.getAttribute('id') }));
                return true;
            },
            NS_PING, 'iq', 'get', null, null,
        );
    }

    onMessage(st) {
        try {
            const from = st.getAttribute('from') || '';
            const type = st.getAttribute('type') || 'normal';
            if (type === 'error') {
                const err = Strophe.serialize(st);
                fail(`${this.side}: received message error: ${err.slice(0, 500)}`);
                return true;
            }
            const bodyEl = st.getElementsByTagName('body')[0];
            if (!bodyEl) return true; // chat states etc.
            const body = bodyEl.textContent;
            if (!body.endsWith(` run=${RUN_ID}`)) {
                // Not from this run (e.g. offline storage left over from an earlier run).
                this.rx.stale++;
                this.log(`ignoring message from an earlier run: from=${from} body=${JSON.stringify(body.slice(0, 80))}`);
                return true;
            }
            if (Strophe.getBareJidFromJid(from) !== this.peerBare) {
                // A message of this run that is not from the peer, e.g. our own
                // outgoing stanza echoed back by the server (ejabberd 23.01 mod_bosh
                // does this when a held request is re-sent with the same rid).
                const xml = Strophe.serialize(st);
                this.rx.unexpected++;
                if (opts.tolerateUnexpected) {
                    this.log(`tolerating unexpected stanza: ${xml.slice(0, 300)}`);
                } else {
                    fail(`${this.side}: unexpected message (not from ${this.peerBare}): ${xml.slice(0, 400)}`);
                }
                return true;
            }
            const m = /#(\d+) /.exec(body);
            const n = m ? Number(m[1]) : NaN;
            const want = makeBody(this.peerSide, n);
            if (body !== want) {
                fail(`${this.side}: body not byte-exact: got ${JSON.stringify(body)} want ${JSON.stringify(want)}`);
                return true;
            }
            if (n === this.rx.expected) {
                const now = Date.now();
                if (this.rx.lastAt) this.rx.maxGapMs = Math.max(this.rx.maxGapMs, now - this.rx.lastAt);
                this.rx.lastAt = now;
                this.rx.expected++;
                this.rx.count++;
            } else if (n < this.rx.expected) {
                fail(`${this.side}: duplicate message #${n} (next expected #${this.rx.expected})`);
            } else {
                fail(`${this.side}: message #${n} arrived but #${this.rx.expected} is missing (gap or out of order)`);
            }
        } catch (e) {
            fail(`${this.side}: message handler error: ${e.message}`);
        }
        return true;
    }

    sendChat(n) {
        // Addressed to the peer's full (bound) JID, not the bare JID: a bare-JID
        // chat message fans out to every available resource of the account,
        // including stale sessions left by an earlier, aborted run; ejabberd
        // re-routes a stale session's undelivered stanzas to the bare JID when
        // that session expires, and they would then show up as duplicates here.
        // --address bare tests bare-JID routing instead.
        const to = opts.address === 'bare' ? this.peerBare : this.peer.conn.jid;
        this.conn.send($msg({ to, type: 'chat', id: `${RUN_ID}-${this.side}-${n}` }).c('body').t(makeBody(this.side, n)));
        this.sent++;
    }

    iq(stanza, timeoutMs, what) {
        return new Promise((resolve, reject) => {
            this.conn.sendIQ(
                stanza,
                (res) => resolve(res),
                (err) => reject(new Error(err === null
                    ? `${this.side}: ${what} timed out after ${timeoutMs} ms`
                    : `${this.side}: ${what} returned error: ${Strophe.serialize(err).slice(0, 300)}`)),
                timeoutMs,
            );
        });
    }

    /** Initial presence, then a ping round trip so the server has processed it. */
    async goOnline() {
        this.conn.send($pres());
        const ping = $iq({ type: 'get', to: Strophe.getDomainFromJid(this.conn.jid) }).c('ping', { xmlns: NS_PING });
        // A server without mod_ping answers with an error IQ: still a round trip.
        await this.iq(ping, 15000, 'presence barrier ping').catch((e) => {
            if (/timed out/.test(e.message)) throw e;
        });
    }

    async roster() {
        const res = await this.iq($iq({ type: 'get' }).c('query', { xmlns: NS_ROSTER }), 15000, 'roster get');
        const q = res.getElementsByTagName('query')[0];
        if (!q || q.namespaceURI !== NS_ROSTER) throw new Error(`${this.side}: roster result has no jabber:iq:roster query`);
        return q.getElementsByTagName('item').length;
    }

    async logout() {
        this.closing = true;
        this.sawConnTimeout = false;
        this.conn.disconnect('test done');
        // Strophe's disconnection_timeout is 3 s; after that it forces DISCONNECTED
        // via CONNTIMEOUT, which we report as an unclean logout.
        await waitFor(() => this.disconnected, 10000, `${this.side} DISCONNECTED after logout`);
        if (this.sawConnTimeout) {
            throw new Error(`${this.side}: logout was not clean (server did not answer the terminate request; CONNTIMEOUT)`);
        }
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
    note(`logged in: a=${clients.a.conn.jid} b=${clients.b.conn.jid}`);
    phase = 'presence';
    for (const c of [clients.a, clients.b]) c.installHandlers();
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

async function sendPaced(client, count, paceMs) {
    for (let n = 1; n <= count && !finished; n++) {
        client.sendChat(n);
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
    finish({ ok: true, mode: 'chat', ...stats(), roster }, 0);
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
        a.sendChat(n);
        if (n % Math.max(1, Math.round(5000 / opts.intervalMs)) === 0) {
            note(`live: sent ${n}/${total}, b received ${b.rx.count}`);
        }
    }
    phase = 'settle';
    note(`live: all ${total} sent; waiting up to ${opts.settle} s for b to receive them (has ${b.rx.count})`);
    await waitFor(() => b.rx.count >= total, opts.settle * 1000,
        `stragglers: b received ${b.rx.count}/${total} within ${opts.settle} s after the last send`).catch((e) => {
        throw new Error(b.describe(e.message));
    });
    await delay(300);
    const roster = await rosterAndLogout();
    finish({ ok: true, mode: 'live', ...stats(), roster, max_gap_ms: { b: b.rx.maxGapMs } }, 0);
}

// ---------------------------------------------------------------------------

async function main() {
    try {
        opts = parseCli(process.argv.slice(2));
    } catch (e) {
        fail(`bad arguments: ${e.message}`);
        return;
    }
    Strophe.setLogLevel(opts.stropheLog);
    const timer = setTimeout(() => {
        const extra = perSide((c) => c.describe(`${c.side}`));
        fail(`overall timeout of ${opts.timeout} s exceeded in phase ${phase} (${Object.values(extra).join(' | ')})`);
    }, opts.timeout * 1000);
    note(`mode=${opts.mode} url=${opts.url} a=${opts.a} b=${opts.b} run=${RUN_ID} timeout=${opts.timeout}s wait=${opts.wait}s maxRetries=${opts.maxRetries}`);
    if (opts.mode === 'chat') await runChat();
    else await runLive();
}

main().catch(fail);
