// One real Strophe.js (5.x) connection under Node, over BOSH (http/https URL)
// or Strophe's WebSocket transport (ws/wss URL): login, presence, numbered chat
// messages checked by an Inbox, roster, logout. Used by bosh_chat.mjs and
// mixed_chat.mjs; see common.mjs for the client shape the modes expect.
//
// Import './console-to-stderr.mjs' first in the script (Strophe logs through
// console.debug/info, which Node writes to stdout).

import { Strophe, $iq, $msg, $pres } from './node-env.mjs';
import { Inbox, RUN_ID, makeBody, pollUntil, numberOption } from './common.mjs';

const NS_PING = 'urn:xmpp:ping';
const NS_ROSTER = 'jabber:iq:roster';

/** parseArgs specs of the options that configure a StropheClient (besides the URL). */
export const STROPHE_OPTION_SPECS = {
    wait: { type: 'string', default: '60' },
    'max-retries': { type: 'string', default: '5' },
    'strophe-log': { type: 'string', default: 'warn' },
    'tolerate-unexpected': { type: 'boolean', default: false },
    'flush-every': { type: 'string', default: '0' },
};

const LOG_LEVELS = { debug: 0, info: 1, warn: 2, error: 3, fatal: 4 };

/** The STROPHE_OPTION_SPECS values, checked: {wait, maxRetries, stropheLog, tolerateUnexpected, flushEvery}. */
export function stropheOptions(values) {
    if (!(values['strophe-log'] in LOG_LEVELS)) throw new Error('--strophe-log must be one of ' + Object.keys(LOG_LEVELS));
    return {
        wait: numberOption(values, 'wait', 1, 300),
        maxRetries: numberOption(values, 'max-retries', 1, 50),
        stropheLog: LOG_LEVELS[values['strophe-log']],
        tolerateUnexpected: values['tolerate-unexpected'],
        flushEvery: numberOption(values, 'flush-every', 0, 100000),
    };
}

const STATUS_NAME = Object.fromEntries(Object.entries(Strophe.Status).map(([k, v]) => [v, k]));

export class StropheClient {
    /**
     * run: the Run (common.mjs); opts: {url, password, wait, maxRetries, debug,
     * address: 'full'|'bare', tolerateUnexpected}; side: 'a'|'b'; jid, peerJid:
     * bare JIDs of this side's account and of the peer's.
     */
    constructor(run, opts, side, jid, peerJid) {
        this.run = run;
        this.opts = opts;
        this.side = side;
        this.jidArg = jid;
        this.peerBare = Strophe.getBareJidFromJid(peerJid);
        this.peerSide = side === 'a' ? 'b' : 'a';
        this.peer = null; // the other client (any kind): set by loginBoth
        this.sent = 0;
        this.rx = new Inbox({
            side,
            peerSide: this.peerSide,
            peerBare: this.peerBare,
            tolerateUnexpected: opts.tolerateUnexpected,
            log: (m) => this.log(m),
        });
        this.httpErrors = {};
        this.statusLog = [];
        this.connected = false;
        this.disconnected = false;
        this.closing = false; // set while we log out on purpose
        this.sawConnTimeout = false;
    }

    log(msg) {
        this.run.note(`[${this.side}] ${msg}`);
    }

    /** The bound full JID once logged in (before that, what Strophe was given). */
    get jid() {
        return this.conn?.jid || null;
    }

    connect() {
        const { opts } = this;
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
            this.lastHttpError = { status, at_ms: this.run.elapsed() };
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
                else if (!this.closing) this.run.fail(this.describe(this.error));
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
                    this.run.fail(this.describe(this.error || `${this.side}: unexpectedly DISCONNECTED`));
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
                this.run.fail(`${this.side}: received message error: ${err.slice(0, 500)}`);
                return true;
            }
            const bodyEl = st.getElementsByTagName('body')[0];
            if (!bodyEl) return true; // chat states etc.
            const body = bodyEl.textContent;
            const err = this.rx.accept(body, from, () => Strophe.serialize(st));
            if (err) this.run.fail(err);
        } catch (e) {
            this.run.fail(`${this.side}: message handler error: ${e.message}`);
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
        const to = this.opts.address === 'bare' ? this.peerBare : this.peer.jid;
        this.conn.send($msg({ to, type: 'chat', id: `${RUN_ID}-${this.side}-${n}` }).c('body').t(makeBody(this.side, n)));
        this.sent++;
        // Strophe holds outgoing data until no send() came for 100 ms (each send
        // re-arms its idle timer), so messages sent less than 100 ms apart all go
        // in one BOSH body. --flush-every N hands them over every N messages
        // instead (Connection#flush(); still at most 2 requests in flight).
        if (this.opts.flushEvery > 0 && this.sent % this.opts.flushEvery === 0) this.conn.flush();
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
        this.installHandlers();
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
        await this.run.waitFor(() => this.disconnected, 10000, `${this.side} DISCONNECTED after logout`);
        if (this.sawConnTimeout) {
            throw new Error(`${this.side}: logout was not clean (server did not answer the terminate request; CONNTIMEOUT)`);
        }
    }

    /** Logged in and not disconnected: what Run.finish() must close. */
    isOpen() {
        return !!(this.conn && this.connected && !this.disconnected);
    }

    /** Cleanup after a failure: terminate the BOSH session, wait up to 2 s. Resolves true if it ended. */
    async abort() {
        try {
            this.conn.disconnect('aborting');
        } catch (e) {
            this.log(`disconnect during cleanup threw: ${e.message}`);
        }
        return pollUntil(() => this.disconnected, 2000);
    }
}
