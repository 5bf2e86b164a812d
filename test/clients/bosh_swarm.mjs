#!/usr/bin/env node
// Many real Strophe.js BOSH sessions at once, for cluster and restart tests.
//
// Logs in --users users (PREFIX1..PREFIXn@HOST), prints READY on stdout once
// every login has finished, then each logged-in user sends a numbered message
// to its own full JID every --interval-ms for --duration seconds (or until
// SIGUSR2) and checks that they come back in order. The Go test stops an
// ejabberd node, or upgrades the sidecar, meanwhile.
//
// "In order" is the order the server gave them: by the rid of the request
// whose answer carried them, then their place in it. XEP-0124 (14.3) has
// the client process answers in rid order; Strophe processes them as they
// complete, so when its event loop is starved (a loaded machine) and two
// answers are waiting, it can take the later one first, though the server
// sent them a second apart. arrival_out_of_order counts those, for the log.
// At the end each user is one of:
//   alive       still connected, and still receiving its messages
//   terminated  the server ended its session (with the condition Strophe saw)
//   hung        still "connected" but nothing received for --hung-after s
// One JSON line on stdout reports the counts; exit 0 unless something broke
// the client itself (the Go test judges the counts).
//
//   node bosh_swarm.mjs --url http://127.0.0.1:5280/bosh --users 200 --password demo --duration 30

import './console-to-stderr.mjs'; // must stay first
import { parseArgs } from 'node:util';
import { Strophe, $msg, $pres, useLocalAddress } from './node-env.mjs';

const { values } = parseArgs({
    options: {
        url: { type: 'string' },
        users: { type: 'string', default: '10' },
        prefix: { type: 'string', default: 'user' },
        host: { type: 'string', default: 'localhost' },
        password: { type: 'string', default: process.env.DEMO_PASSWORD || 'demo' },
        duration: { type: 'string', default: '30' },
        'interval-ms': { type: 'string', default: '1000' },
        'hung-after': { type: 'string', default: '5' },
        concurrency: { type: 'string', default: '20' },
        wait: { type: 'string', default: '20' },
        timeout: { type: 'string', default: '180' },
        'local-address': { type: 'string' },
    },
});
const num = (k, lo, hi) => {
    const v = Number(values[k]);
    if (!Number.isInteger(v) || v < lo || v > hi) throw new Error(`--${k} must be an integer in ${lo}..${hi}`);
    return v;
};
if (!values.url || !/^https?:\/\/(127\.\d+\.\d+\.\d+|localhost|\[::1\])[:/]/.test(values.url)) {
    throw new Error('--url must be a loopback BOSH URL');
}
const opts = {
    users: num('users', 1, 5000),
    duration: num('duration', 1, 3600),
    intervalMs: num('interval-ms', 50, 60000),
    hungAfter: num('hung-after', 1, 600),
    concurrency: num('concurrency', 1, 500),
    wait: num('wait', 8, 300), // >= 8: see bosh_chat.mjs on Strophe's retry schedule
    timeout: num('timeout', 10, 7200),
};
if (values['local-address']) useLocalAddress(values['local-address']);
Strophe.setLogLevel(Strophe.LogLevel.FATAL);

const t0 = Date.now();
const note = (m) => process.stderr.write(`[bosh_swarm +${((Date.now() - t0) / 1000).toFixed(3)}s] ${m}\n`);

class User {
    constructor(i) {
        this.jid = `${values.prefix}${i}@${values.host}`;
        this.state = 'new';
        this.condition = '';
        this.sent = 0;
        this.expected = 1;
        this.received = 0;
        this.outOfOrder = 0; // at the end: by rid (see the top)
        this.arrivalOutOfOrder = 0;
        this.rxRid = null; // the rid whose answer is being processed
        this.rx = []; // [rid, place, n] of each message received
        this.lastRxAt = 0;
    }

    login() {
        this.conn = new Strophe.Connection(values.url);
        // Strophe binds _dataRecv to each request as it makes it, and runs
        // the stanza handlers inside it: wrapped here, onMessage knows the
        // rid of the answer it is in.
        const dataRecv = this.conn._dataRecv.bind(this.conn);
        this.conn._dataRecv = (req, raw) => {
            this.rxRid = req.rid;
            try {
                return dataRecv(req, raw);
            } finally {
                this.rxRid = null;
            }
        };
        return new Promise((resolve) => {
            this.conn.connect(this.jid, values.password, (status, condition) => {
                const S = Strophe.Status;
                if (status === S.CONNECTED) {
                    this.state = 'alive';
                    this.fullJid = this.conn.jid;
                    this.conn.addHandler((m) => this.onMessage(m), null, 'message');
                    this.conn.send($pres());
                    resolve();
                } else if (status === S.CONNFAIL || status === S.AUTHFAIL || status === S.CONNTIMEOUT || status === S.ERROR) {
                    this.condition ||= condition || Object.keys(S).find((k) => S[k] === status);
                } else if (status === S.DISCONNECTED) {
                    // Ended by us (closing), by the server (was alive), or never in.
                    if (this.state === 'new') this.state = 'failed';
                    else if (this.state === 'alive') this.state = 'terminated';
                    else if (this.state === 'closing') this.state = 'closed';
                    this.onDisconnected?.();
                    resolve();
                }
            }, opts.wait, 1);
        });
    }

    onMessage(m) {
        const body = m.getElementsByTagName('body')[0];
        const match = body && /^swarm #(\d+)$/.exec(body.textContent);
        if (match) {
            const n = Number(match[1]);
            if (n !== this.expected) this.arrivalOutOfOrder++;
            this.expected = n + 1;
            this.rx.push([this.rxRid ?? Infinity, this.rx.length, n]);
            this.received++;
            this.lastRxAt = Date.now();
        }
        return true;
    }

    tick() {
        if (this.state !== 'alive') return;
        this.sent++;
        this.conn.send($msg({ to: this.fullJid, type: 'chat' }).c('body').t(`swarm #${this.sent}`));
    }

    /** Counts the messages out of the server's order (see the top). */
    countOutOfOrder() {
        const byRid = [...this.rx].sort((x, y) => (x[0] - y[0]) || (x[1] - y[1]));
        let want = 1;
        for (const [, , n] of byRid) {
            if (n !== want) this.outOfOrder++;
            want = n + 1;
        }
    }

    logout() {
        if (this.state !== 'alive') return Promise.resolve();
        this.state = 'closing';
        return new Promise((resolve) => {
            const done = setTimeout(resolve, 5000);
            this.onDisconnected = () => {
                clearTimeout(done);
                resolve();
            };
            this.conn.disconnect('swarm done');
        });
    }
}

async function main() {
    const users = Array.from({ length: opts.users }, (_, i) => new User(i + 1));
    // Log in with bounded concurrency.
    let next = 0;
    await Promise.all(Array.from({ length: Math.min(opts.concurrency, users.length) }, async () => {
        while (next < users.length) await users[next++].login();
    }));
    const loggedIn = users.filter((u) => u.state === 'alive').length;
    note(`logged in ${loggedIn}/${users.length}`);
    process.stdout.write(`READY ${JSON.stringify({ logged_in: loggedIn, failed: users.length - loggedIn })}\n`);

    const start = Date.now();
    let stopped = false;
    const timers = users.map((u, i) => setTimeout(function loop() {
        u.tick();
        if (!stopped && Date.now() - start < opts.duration * 1000) timers[i] = setTimeout(loop, opts.intervalMs);
    }, (i * opts.intervalMs) / users.length));
    // Until --duration is over, or SIGUSR2 says the test is done with us.
    await new Promise((r) => {
        setTimeout(r, opts.duration * 1000);
        process.once('SIGUSR2', r);
    });
    stopped = true;
    const stoppedAt = Date.now();
    timers.forEach(clearTimeout);
    // The last answers: until each live user has its messages back, at
    // most 10 s (a loaded machine can take seconds), at least 2 s.
    const settled = () => users.every((u) => u.state !== 'alive' || u.received >= u.sent);
    for (let i = 0; i < 100 && (i < 20 || !settled()); i++) await new Promise((r) => setTimeout(r, 100));

    // Hung: nothing received in the hungAfter s up to 2 s after the stop
    // (however long the wait for the last messages above took).
    const now = Math.min(Date.now(), stoppedAt + 2000);
    const states = {};
    for (const u of users) states[u.state] = (states[u.state] || 0) + 1;
    const report = { states, ok: true, users: users.length, logged_in: loggedIn, alive: 0, hung: 0, terminated: {}, failed_login: 0, out_of_order: 0, arrival_out_of_order: 0, sent: 0, received: 0 };
    for (const u of users) {
        u.countOutOfOrder();
        report.sent += u.sent;
        report.received += u.received;
        report.out_of_order += u.outOfOrder;
        report.arrival_out_of_order += u.arrivalOutOfOrder;
        if (u.state === 'alive' && now - u.lastRxAt > opts.hungAfter * 1000) report.hung++;
        else if (u.state === 'alive') report.alive++;
        else if (u.state === 'terminated') report.terminated[u.condition || 'none'] = (report.terminated[u.condition || 'none'] || 0) + 1;
        else if (u.state === 'failed') report.failed_login++;
    }
    await Promise.all(users.map((u) => u.logout()));
    process.stdout.write(JSON.stringify(report) + '\n');
    process.exit(0);
}

setTimeout(() => {
    process.stdout.write(JSON.stringify({ ok: false, error: `timeout after ${opts.timeout}s` }) + '\n');
    process.exit(1);
}, opts.timeout * 1000).unref();

main().catch((e) => {
    process.stdout.write(JSON.stringify({ ok: false, error: String(e && e.stack || e) }) + '\n');
    process.exit(1);
});
