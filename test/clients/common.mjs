// What the chat scripts (bosh_chat.mjs, xmpp_chat.mjs, mixed_chat.mjs) share,
// whatever library their clients use:
//
//  * Run: the run's clock, stderr progress lines, the phase, the one JSON result
//    line on stdout (finish/fail) with a bounded cleanup of what is still
//    connected, the overall timeout, and bounded waits.
//  * The message bodies (numbered, XML-special and non-ASCII, tagged with a
//    per-run id) and Inbox, which checks that a side receives its peer's
//    messages exactly once, in order and byte-exact.
//  * The two modes (chat, live) over any pair of clients that have this shape:
//      side ('a'|'b'), peer, jid, sent, rx (an Inbox), closing,
//      connect(), goOnline(), sendChat(n), roster(), logout(),
//      describe(msg), isOpen(), abort() -> bool (<= ~2 s), and optionally onFinish().
//    (strophe_client.mjs and xmpp_client.mjs.)

import { randomBytes } from 'node:crypto';
import { parseArgs } from 'node:util';

export const delay = (ms) => new Promise((r) => setTimeout(r, ms));

/** p, or a rejection after ms (the timer does not keep the process alive). */
export function within(p, ms, what) {
    let timer;
    return Promise.race([
        p,
        new Promise((_, reject) => {
            timer = setTimeout(() => reject(new Error(`${what} timed out after ${ms} ms`)), ms);
            timer.unref();
        }),
    ]).finally(() => clearTimeout(timer));
}

/** Poll pred() every stepMs for at most limitMs; resolves with its last value. Never throws. */
export async function pollUntil(pred, limitMs, stepMs = 50) {
    const maxSteps = Math.ceil(limitMs / stepMs);
    for (let i = 0; i < maxSteps && !pred(); i++) await delay(stepMs);
    return !!pred();
}

/** A numeric command-line option (parseArgs values) in [min, max]. */
export function numberOption(values, name, min, max) {
    const v = Number(values[name]);
    if (!Number.isFinite(v) || v < min || v > max) {
        throw new Error(`--${name} must be a number in [${min}, ${max}], got ${JSON.stringify(values[name])}`);
    }
    return v;
}

// ---------------------------------------------------------------------------
// Command line: what every chat script takes
// ---------------------------------------------------------------------------

/** parseArgs specs of the options every chat script has; paceMs: its --pace-ms default. */
export function chatOptionSpecs(paceMs) {
    return {
        a: { type: 'string' },
        b: { type: 'string' },
        password: { type: 'string' },
        mode: { type: 'string', default: 'chat' },
        count: { type: 'string', default: '100' },
        'pace-ms': { type: 'string', default: String(paceMs) },
        duration: { type: 'string', default: '20' },
        'interval-ms': { type: 'string', default: '200' },
        settle: { type: 'string', default: '10' },
        'until-signal': { type: 'boolean', default: false },
        timeout: { type: 'string' },
        address: { type: 'string', default: 'full' },
        'local-address': { type: 'string' },
        debug: { type: 'boolean', default: false },
        help: { type: 'boolean', short: 'h', default: false },
    };
}

/** Strict parseArgs; --help prints usage to stderr and exits 0. */
export function parseCommandLine(argv, options, usage) {
    const { values } = parseArgs({ args: argv, strict: true, allowPositionals: false, options });
    if (values.help) {
        process.stderr.write(usage + '\n');
        process.exit(0);
    }
    return values;
}

/**
 * The chatOptionSpecs() values, checked (--a/--b are the script's business):
 * {password, mode, count, paceMs, duration, intervalMs, settle, untilSignal,
 * address, localAddress, debug}. Call chatTimeout() once the mode is known.
 */
export function chatOptions(values) {
    const num = (name, min, max) => numberOption(values, name, min, max);
    const password = values.password ?? process.env.DEMO_PASSWORD;
    if (!password) throw new Error('no password: pass --password or set DEMO_PASSWORD');
    if (!['chat', 'live'].includes(values.mode)) throw new Error(`--mode must be chat or live, got ${values.mode}`);
    if (!['full', 'bare'].includes(values.address)) throw new Error(`--address must be full or bare, got ${values.address}`);
    const localAddress = values['local-address'];
    if (localAddress !== undefined && !/^127\.\d{1,3}\.\d{1,3}\.\d{1,3}$|^::1$/.test(localAddress)) {
        throw new Error('--local-address must be a loopback address');
    }
    return {
        password,
        mode: values.mode,
        count: num('count', 1, 100000),
        paceMs: num('pace-ms', 0, 10000),
        duration: num('duration', 1, 3600),
        intervalMs: num('interval-ms', 10, 60000),
        settle: num('settle', 0, 600),
        untilSignal: values['until-signal'],
        address: values.address,
        localAddress,
        debug: values.debug,
    };
}

/** --timeout, or 60 s (live: enough for duration + settle + login/logout). */
export function chatTimeout(values, opts) {
    if (values.timeout !== undefined) return numberOption(values, 'timeout', 1, 86400);
    return opts.mode === 'live' ? Math.max(60, opts.duration + opts.settle + 30) : 60;
}

// ---------------------------------------------------------------------------
// Message bodies: numbered, with XML-special and non-ASCII text (incl. a
// non-BMP code point), tagged with a per-run id so leftovers from an earlier
// run (e.g. offline storage on the server) are recognised and ignored.
// ---------------------------------------------------------------------------

export const RUN_ID = randomBytes(4).toString('hex');
export const SPECIAL = `<&>"' ]]> ünïcödé 中文 🚀`;

export function makeBody(fromSide, n) {
    return `${fromSide}->${fromSide === 'a' ? 'b' : 'a'} #${n} ${SPECIAL} run=${RUN_ID}`;
}

/**
 * What one side has received from its peer: exactly once, in order, byte-exact.
 * The fields (count, expected, stale, unexpected, maxGapMs) are what the result
 * line reports.
 */
export class Inbox {
    constructor({ side, peerSide, peerBare, tolerateUnexpected = false, log = () => {} }) {
        this.side = side;
        this.peerSide = peerSide;
        this.peerBare = peerBare;
        this.tolerateUnexpected = tolerateUnexpected;
        this.log = log;
        this.count = 0; // received in order, exactly once
        this.expected = 1; // next number
        this.stale = 0; // tagged with another run's id: ignored
        this.unexpected = 0; // tagged with this run's id but not from the peer
        this.lastAt = 0;
        this.maxGapMs = 0;
    }

    /**
     * Check one received message body (a message without a body is not passed
     * in). from: the stanza's from attribute; raw(): the stanza as text, for error
     * messages. Returns null when all is well (or the message is ignored), else
     * the failure message.
     */
    accept(body, from, raw) {
        if (!body.endsWith(` run=${RUN_ID}`)) {
            // Not from this run (e.g. offline storage left over from an earlier run).
            this.stale++;
            this.log(`ignoring message from an earlier run: from=${from} body=${JSON.stringify(body.slice(0, 80))}`);
            return null;
        }
        if ((from || '').split('/')[0] !== this.peerBare) {
            // A message of this run that is not from the peer, e.g. our own
            // outgoing stanza echoed back by the server (ejabberd 23.01 mod_bosh
            // does this when a held request is re-sent with the same rid).
            this.unexpected++;
            if (this.tolerateUnexpected) {
                this.log(`tolerating unexpected stanza: ${raw().slice(0, 300)}`);
                return null;
            }
            return `${this.side}: unexpected message (not from ${this.peerBare}): ${raw().slice(0, 400)}`;
        }
        const m = /#(\d+) /.exec(body);
        const n = m ? Number(m[1]) : NaN;
        const want = makeBody(this.peerSide, n);
        if (body !== want) {
            return `${this.side}: body not byte-exact: got ${JSON.stringify(body)} want ${JSON.stringify(want)}`;
        }
        if (n === this.expected) {
            const now = Date.now();
            if (this.lastAt) this.maxGapMs = Math.max(this.maxGapMs, now - this.lastAt);
            this.lastAt = now;
            this.expected++;
            this.count++;
            return null;
        }
        if (n < this.expected) return `${this.side}: duplicate message #${n} (next expected #${this.expected})`;
        return `${this.side}: message #${n} arrived but #${this.expected} is missing (gap or out of order)`;
    }
}

// ---------------------------------------------------------------------------
// One run: result line, failure, cleanup
// ---------------------------------------------------------------------------

export class Run {
    /** tag: the prefix of stderr lines, e.g. "xmpp_chat". */
    constructor(tag) {
        this.tag = tag;
        this.t0 = Date.now();
        this.opts = { mode: 'chat' };
        this.phase = 'init';
        this.finished = false;
        this.clients = {}; // a, b
        this.stats = () => ({ elapsed_ms: this.elapsed() }); // the script's counters, in every result
    }

    elapsed() {
        return Date.now() - this.t0;
    }

    note(msg) {
        process.stderr.write(`[${this.tag} +${(this.elapsed() / 1000).toFixed(3)}s] ${msg}\n`);
    }

    perSide(fn) {
        const out = {};
        for (const k of ['a', 'b']) if (this.clients[k]) out[k] = fn(this.clients[k]);
        return out;
    }

    /** Resolve when pred() is true, checking every stepMs, failing after limitMs. */
    async waitFor(pred, limitMs, what, stepMs = 50) {
        const deadline = Date.now() + limitMs;
        const maxSteps = Math.ceil(limitMs / stepMs) + 1;
        for (let i = 0; i < maxSteps && !this.finished; i++) {
            if (pred()) return true;
            if (Date.now() >= deadline) break;
            await delay(stepMs);
        }
        if (pred()) return true;
        throw new Error(`timed out after ${limitMs} ms waiting for ${what}`);
    }

    /** Print the result line and exit (once). */
    async finish(obj, code) {
        if (this.finished) return;
        this.finished = true;
        // On failure, close whatever is still connected (bounded to ~2 s) so that
        // no session of ours lingers on the server and disturbs the next run (a
        // half-dead BOSH session keeps receiving stanzas until its inactivity
        // timeout, and ejabberd re-routes them when it expires).
        const all = Object.values(this.clients);
        const open = all.filter((c) => c.isOpen());
        for (const c of all) {
            c.closing = true;
            try {
                c.onFinish?.();
            } catch (e) {
                this.note(`[${c.side}] onFinish threw: ${e.message}`);
            }
        }
        if (open.length) {
            const results = await Promise.allSettled(open.map((c) => c.abort()));
            const closed = results.filter((r) => r.status === 'fulfilled' && r.value).length;
            this.note(`cleanup: ${closed}/${open.length} connection(s) closed`);
        }
        process.stdout.write(JSON.stringify(obj) + '\n', () => process.exit(code));
        // Belt and braces: never hang after the result is out.
        setTimeout(() => process.exit(code), 2000).unref();
    }

    /**
     * Fail the run: {"ok":false,"error":...,"phase":...} plus the counters, exit 1.
     * err: an Error (its name is prefixed unless it is plain "Error"; an XMPP
     * error condition and a Node error code are reported too) or a string.
     */
    fail(err) {
        if (this.finished) return;
        const message = err instanceof Error
            ? `${err.name && err.name !== 'Error' ? err.name + ': ' : ''}${err.message}`
            : String(err);
        this.note(`FAIL in phase ${this.phase}: ${message}`);
        const out = { ok: false, mode: this.opts.mode, error: message, phase: this.phase };
        if (err && typeof err === 'object' && typeof err.condition === 'string') out.error_condition = err.condition;
        if (err && typeof err === 'object' && err.code) out.error_code = String(err.code);
        this.finish({ ...out, ...this.stats() }, 1);
    }

    /** Fail when the overall --timeout (seconds) runs out. */
    startTimer(seconds) {
        return setTimeout(() => {
            const extra = this.perSide((c) => c.describe(c.side));
            this.fail(new Error(`overall timeout of ${seconds} s exceeded in phase ${this.phase} (${Object.values(extra).join(' | ')})`));
        }, seconds * 1000);
    }
}

// ---------------------------------------------------------------------------
// The modes, for any two clients (see the top of this file)
// ---------------------------------------------------------------------------

export async function loginBoth(run, a, b) {
    run.phase = 'login';
    run.clients.a = a;
    run.clients.b = b;
    a.peer = b;
    b.peer = a;
    await Promise.all([a.connect(), b.connect()]);
    run.note(`logged in: a=${a.jid} b=${b.jid}`);
    run.phase = 'presence';
    await Promise.all([a.goOnline(), b.goOnline()]);
}

export async function rosterAndLogout(run) {
    const { a, b } = run.clients;
    run.phase = 'roster';
    const [ra, rb] = await Promise.all([a.roster(), b.roster()]);
    run.note(`roster sizes: a=${ra} b=${rb}`);
    run.phase = 'logout';
    await Promise.all([a.logout(), b.logout()]);
    run.note('both logged out');
    return { a: ra, b: rb };
}

async function sendPaced(run, c, count, paceMs) {
    for (let n = 1; n <= count && !run.finished; n++) {
        await c.sendChat(n);
        if (paceMs > 0) await delay(paceMs);
    }
}

/**
 * chat: a->b and b->a, opts.count messages each (opts.paceMs apart), each
 * verified exactly once, in order, byte-exact; a roster get on each side;
 * logout. The clients must be logged in (loginBoth).
 */
export async function runChat(run) {
    const { opts } = run;
    const { a, b } = run.clients;
    run.phase = 'exchange';
    run.note(`sending ${opts.count} messages each way`);
    await Promise.all([sendPaced(run, a, opts.count, opts.paceMs), sendPaced(run, b, opts.count, opts.paceMs)]);
    const budget = Math.max(1000, opts.timeout * 1000 - run.elapsed());
    await run.waitFor(() => a.rx.count >= opts.count && b.rx.count >= opts.count, budget,
        `all messages (a got ${a.rx.count}/${opts.count}, b got ${b.rx.count}/${opts.count})`);
    // Give a duplicate that might trail the last message a moment to show up.
    await delay(300);
    const roster = await rosterAndLogout(run);
    run.finish({ ok: true, mode: 'chat', ...run.stats(), roster }, 0);
}

/**
 * live: READY on stdout, then a sends one message to b every opts.intervalMs
 * for opts.duration s (b checks in-order, gap-free, duplicate-free delivery),
 * up to opts.settle s for stragglers, roster, logout. The clients must be
 * logged in (loginBoth). With opts.untilSignal, a stops sending early on
 * SIGUSR2 (--duration is then a cap): a test that must span an event sends
 * until the event is over, however slowly the box runs.
 *
 * hooks (all optional, may be async):
 *   start()          right after READY (e.g. schedule a connection drop)
 *   beforeSend(n)    before a sends message n (e.g. wait while a reconnects)
 *   settled()        once b has everything, before the roster
 *   result()         extra fields for the success line
 */
export async function runLive(run, hooks = {}) {
    const { opts } = run;
    const { a, b } = run.clients;
    run.phase = 'live';
    let stopRequested = false;
    // Installed before READY, so that an early signal cannot end the process
    // (SIGUSR2's default action).
    if (opts.untilSignal) {
        process.once('SIGUSR2', () => {
            stopRequested = true;
            run.note('SIGUSR2: a stops sending');
        });
    }
    process.stdout.write('READY\n');
    const cap = Math.max(1, Math.floor((opts.duration * 1000) / opts.intervalMs));
    run.note(`READY; a sends ${opts.untilSignal ? 'until SIGUSR2, at most ' : ''}${cap} messages to b, one every ${opts.intervalMs} ms`);
    await hooks.start?.();
    const start = Date.now();
    let total = 0; // messages a has sent
    for (let n = 1; n <= cap && !run.finished && !stopRequested; n++) {
        const due = start + (n - 1) * opts.intervalMs;
        const now = Date.now();
        if (due > now) await delay(due - now);
        if (run.finished) return;
        await hooks.beforeSend?.(n);
        if (run.finished) return;
        await a.sendChat(n);
        total = n;
        if (n % Math.max(1, Math.round(5000 / opts.intervalMs)) === 0) {
            run.note(`live: sent ${n}/${cap}, b received ${b.rx.count}`);
        }
    }
    run.phase = 'settle';
    run.note(`live: all ${total} sent; waiting up to ${opts.settle} s for b to receive them (has ${b.rx.count})`);
    await run.waitFor(() => b.rx.count >= total, opts.settle * 1000,
        `stragglers: b received ${b.rx.count}/${total} within ${opts.settle} s after the last send`).catch((e) => {
        throw new Error(b.describe(e.message));
    });
    await delay(300);
    await hooks.settled?.();
    const roster = await rosterAndLogout(run);
    const extra = (await hooks.result?.()) || {};
    run.finish({ ok: true, mode: 'live', ...run.stats(), roster, max_gap_ms: { b: b.rx.maxGapMs }, ...extra }, 0);
}
