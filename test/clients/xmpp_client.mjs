// One real @xmpp/client (xmpp.js 0.14) connection under Node, over XMPP/TCP
// (STARTTLS), direct TLS (XEP-0368) or WebSocket (RFC 7395): login, presence,
// numbered chat messages checked by an Inbox, roster, logout, and (for
// xmpp_chat.mjs --drop-at) an abrupt connection drop followed by XEP-0198
// resumption. Used by xmpp_chat.mjs and mixed_chat.mjs; see common.mjs for the
// client shape the modes expect, and xmpp_chat.mjs's header for how TLS
// options, --insecure and --local-address reach Node.

import { readFileSync } from 'node:fs';
import net from 'node:net';
import { StringDecoder } from 'node:string_decoder';
import tls from 'node:tls';
import WsWebSocket from 'ws';
import { client, xml } from '@xmpp/client';
import TlsSocketWrapper from '@xmpp/tls/lib/Socket.js';
import { Inbox, RUN_ID, makeBody, within, numberOption } from './common.mjs';

const NS_PING = 'urn:xmpp:ping';
const NS_ROSTER = 'jabber:iq:roster';
const NS_SASL = 'urn:ietf:params:xml:ns:xmpp-sasl';
const NS_SASL2 = 'urn:xmpp:sasl:2';
const NS_TLS = 'urn:ietf:params:xml:ns:xmpp-tls';
const NS_STREAM = 'http://etherx.jabber.org/streams';
const NS_SM = 'urn:xmpp:sm:3';

// --drop-at: how long the dropped side may take to resume, and how many
// reconnect attempts it gets (@xmpp/reconnect tries every second).
export const RESUME_LIMIT_MS = 30000;
export const MAX_RECONNECTS = 10;

// ---------------------------------------------------------------------------
// Command line: the options that configure an XmppClient
// ---------------------------------------------------------------------------

/** parseArgs specs of the options that configure an XmppClient (xmpp_chat.mjs, mixed_chat.mjs). */
export const XMPP_OPTION_SPECS = {
    service: { type: 'string' },
    domain: { type: 'string' },
    'step-timeout-ms': { type: 'string', default: '10000' },
    starttls: { type: 'string', default: 'optional' },
    insecure: { type: 'boolean', default: false },
    ca: { type: 'string' },
    sm: { type: 'string', default: 'auto' },
};

/**
 * The XMPP_OPTION_SPECS values but --domain, checked: {service, transport:
 * 'tcp'|'tls'|'websocket', stepTimeoutMs, starttls, insecure, ca, sm}.
 */
export function xmppOptions(values) {
    if (!values.service) throw new Error('--service is required');
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
    if (!['required', 'optional'].includes(values.starttls)) {
        throw new Error(`--starttls must be required or optional, got ${values.starttls}`);
    }
    if (values.starttls === 'required' && transport !== 'tcp') {
        throw new Error('--starttls required only applies to an xmpp:// (TCP) service');
    }
    if (!['auto', 'off'].includes(values.sm)) throw new Error(`--sm must be auto or off, got ${values.sm}`);
    return {
        service: values.service,
        transport,
        stepTimeoutMs: numberOption(values, 'step-timeout-ms', 100, 120000),
        starttls: values.starttls,
        insecure: values.insecure,
        ca: values.ca !== undefined ? readFileSync(values.ca, 'utf8') : undefined,
        sm: values.sm,
    };
}

/**
 * --a/--b: a local part ("alice") with --domain, or a bare JID
 * ("alice@localhost", which gives the domain). Returns {domain, a, b} (local parts).
 */
export function xmppAccounts(values) {
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
    return { domain, a, b };
}

// ---------------------------------------------------------------------------
// Wiring TLS options and the local address into @xmpp/client (see the header)
// ---------------------------------------------------------------------------

function tlsOptions(opts) {
    const o = {
        servername: opts.domain,
        rejectUnauthorized: !opts.insecure,
    };
    if (opts.ca) o.ca = opts.ca;
    return o;
}

/** opts: {domain, insecure, ca, stepTimeoutMs}. Once per process. */
export function installTlsOptions(opts) {
    const original = TlsSocketWrapper.prototype.connect;
    if (typeof original !== 'function' || original.__megaphonePatched) {
        throw new Error('@xmpp/tls/lib/Socket.js has no connect() to wrap: @xmpp/client layout changed?');
    }
    const patched = function connect(options, ...rest) {
        const extra = tlsOptions(opts);
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

/** opts: {service, stepTimeoutMs, localAddress, and for wss: the TLS ones}. Once per process. */
export function installWebSocket(opts) {
    const wsOptions = { handshakeTimeout: opts.stepTimeoutMs };
    if (opts.localAddress) wsOptions.localAddress = opts.localAddress;
    if (opts.service.startsWith('wss:')) Object.assign(wsOptions, tlsOptions(opts));
    // @xmpp/websocket calls `new WebSocket(url, ["xmpp"])` and listens with
    // addEventListener (open/message/error/close), which ws supports.
    globalThis.WebSocket = class MegaphoneWebSocket extends WsWebSocket {
        constructor(url, protocols) {
            super(url, protocols, wsOptions);
        }
    };
}

/** The net.Socket / tls.TLSSocket under @xmpp/client's current socket, if any. */
export function rawSocket(xmpp) {
    const s = xmpp.socket;
    if (!s) return null;
    if (s instanceof net.Socket) return s; // plain TCP (@xmpp/connection-tcp Socket)
    if (s instanceof TlsSocketWrapper) return s.socket; // direct TLS or after STARTTLS
    if (s.socket instanceof WsWebSocket) return s.socket._socket || null; // ws internals, for reporting only
    return null;
}

// ---------------------------------------------------------------------------
// One @xmpp/client connection
// ---------------------------------------------------------------------------

export class XmppClient {
    /**
     * run: the Run (common.mjs); opts: {service, transport: 'tcp'|'tls'|'websocket',
     * domain, password, stepTimeoutMs, starttls: 'required'|'optional', sm:
     * 'auto'|'off', address: 'full'|'bare', localAddress, debug}; side: 'a'|'b';
     * username: this side's local part; peerBare: the peer's bare JID.
     */
    constructor(run, opts, side, username, peerBare) {
        this.run = run;
        this.opts = opts;
        this.side = side;
        this.username = username;
        this.peerBare = peerBare;
        this.peerSide = side === 'a' ? 'b' : 'a';
        this.peer = null; // the other client (any kind): set by loginBoth
        this.sent = 0;
        this.rx = new Inbox({ side, peerSide: this.peerSide, peerBare, log: (m) => this.log(m) });
        this.info = {};
        this.statusLog = [];
        this.errors = [];
        this.online = false;
        this.closing = false; // set while we log out on purpose
        this.socketClose = null; // {clean} from the 'disconnect' event (socket closed)
        this.starttlsOffered = null;
        this.sawProceed = false;
        this.tlsUpgraded = false; // TCP stream upgraded with STARTTLS (so far)
        this.drop = null; // dropConnection(): what happened to the drop and the resumption
        this.dropping = false; // from the drop until the session is resumed
    }

    log(msg) {
        this.run.note(`[${this.side}] ${msg}`);
    }

    describe(msg) {
        // Error events seen so far, minus any that msg already quotes.
        const others = this.errors.filter((e) => !msg.includes(e.replace(/^\w+: /, '')));
        const errs = others.length ? `; errors=[${others.join(' | ')}]` : '';
        return `${msg}; statuses=[${this.statusLog.join(' ')}]${errs}`;
    }

    create() {
        const { opts } = this;
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
        this.fixUtf8Decoding(xmpp);

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
            // While dropped and reconnecting, socket errors (the reset, a refused
            // reconnect) are expected; an XMPP error (SASL, stream error) is not.
            if (this.dropping && !err.condition) return;
            // Before 'online', start() rejects with this error; after it, any error is fatal.
            if (this.online && !this.closing) {
                const e = new Error(this.describe(`${this.side}: ${m}`));
                if (err.condition) e.condition = err.condition;
                this.run.fail(e);
            }
        });
        xmpp.on('disconnect', (arg) => {
            this.socketClose = arg || {};
            if (this.dropping) return; // @xmpp/reconnect takes it from here (see dropConnection)
            if (this.online && !this.closing) {
                const why = this.lastError ? ` after ${this.lastError.name}: ${this.lastError.message}` : '';
                const e = new Error(this.describe(`${this.side}: unexpectedly disconnected${why}`));
                if (this.lastError?.condition) e.condition = this.lastError.condition;
                this.run.fail(e);
            }
        });
        xmpp.on('nonza', (el) => {
            if (el.is('features', NS_STREAM) && !(xmpp.socket instanceof TlsSocketWrapper)
                && opts.transport === 'tcp' && this.starttlsOffered === null) {
                this.starttlsOffered = !!el.getChild('starttls', NS_TLS);
            }
            if (el.is('proceed', NS_TLS)) this.sawProceed = true;
            if (this.drop && el.is('resumed', NS_SM)) this.drop.server_h = Number(el.attrs.h);
            if (this.drop && el.is('failed', NS_SM) && !this.drop.resumed) {
                this.drop.failed = el.children.find((c) => typeof c === 'object')?.name || 'failed';
                this.log(`stream management: the server refused to resume: ${el.toString()}`);
            }
        });
        xmpp.on('send', (el) => {
            if (el.name === 'auth' && el.attrs.xmlns === NS_SASL) this.info.sasl = el.attrs.mechanism;
            if (el.name === 'authenticate' && el.attrs.xmlns === NS_SASL2) this.info.sasl = `SASL2 ${el.attrs.mechanism}`;
            if (this.drop && el.is('resume', NS_SM)) {
                this.drop.resume_h = Number(el.attrs.h);
                this.log(`stream management: <resume h='${el.attrs.h}' previd='${el.attrs.previd}'/> sent`);
            }
        });
        // A fresh session after a drop means the resumption failed (@xmpp/client
        // then binds a new resource): the XEP-0198 guarantee is gone.
        xmpp.on('online', (address) => {
            if (!this.drop || this.drop.resumed || this.closing) return;
            this.drop.fresh_jid = address?.toString() ?? null;
            const why = this.drop.failed ? `server answered <failed/> ${this.drop.failed}`
                : this.drop.resume_h === null ? 'no <resume/> was sent' : 'no <resumed/>';
            this.run.fail(new Error(this.describe(`${this.side}: the session was not resumed after the drop `
                + `(${why}); logged in afresh as ${this.drop.fresh_jid}`)));
        });
        xmpp.streamManagement.on('resumed', () => this.onResumed());
        xmpp.reconnect.on('reconnecting', () => {
            if (!this.drop || this.drop.resumed) return;
            this.drop.reconnects++;
            this.log(`reconnecting (attempt ${this.drop.reconnects}) to resume the session`);
            if (this.drop.reconnects > MAX_RECONNECTS) {
                this.run.fail(new Error(this.describe(`${this.side}: not resumed after ${MAX_RECONNECTS} reconnect attempts`)));
            }
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
     *    instead (an accessor on sm.inbound). Until that reset the accessor reads
     *    as our count (and ignores the library's increments, which we count
     *    already): an <r/> in that same read (ejabberd sends one after every
     *    stanza, e.g. after the echo of our initial presence) must be answered
     *    with it, not with the stale pre-<enabled/> count, or ejabberd ends the
     *    stream ("Client acknowledged more stanzas than sent by server").
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
            get: () => (sinceEnabled !== null ? sinceEnabled : inbound),
            set: (v) => {
                if (sinceEnabled === null) {
                    inbound = v;
                } else if (v === 0) {
                    // The library's deferred reset: from here on it counts again.
                    inbound = sinceEnabled;
                    sinceEnabled = null;
                }
                // else: an increment before that reset, already in sinceEnabled.
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

    /**
     * @xmpp/connection 0.14.0 decodes every socket 'data' chunk on its own
     * (`data.toString('utf8')` in _onData), so a multi-byte character split across
     * two chunks turns into U+FFFD on both sides of the split. TCP may split
     * anywhere, and Node hands TLS data over in pieces of at most 16 KiB, so a
     * burst of stanzas (a server that coalesces its writes) splits characters now
     * and then. Decode the byte stream with a StringDecoder instead, a new one for
     * each socket (after STARTTLS the TLS wrapper is a new socket, and the plain
     * stream ended with a whole <proceed/>). WebSocket messages are whole elements
     * (RFC 7395) and may come as strings: those are passed on as before. Must run
     * before the first connect: the library binds _onData when it first attaches
     * a socket.
     */
    fixUtf8Decoding(xmpp) {
        if (typeof xmpp._onData !== 'function' || xmpp.socket) {
            throw new Error('@xmpp/client layout changed: no Connection#_onData to replace (see fixUtf8Decoding)');
        }
        let decoder = null;
        let decoderFor = null;
        xmpp._onData = function onData(data) {
            if (!Buffer.isBuffer(data)) {
                this.parser.write(data.toString('utf8'));
                return;
            }
            if (decoderFor !== this.socket) {
                decoder = new StringDecoder('utf8');
                decoderFor = this.socket;
            }
            this.parser.write(decoder.write(data));
        };
    }

    async connect() {
        const { opts } = this;
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
                this.run.fail(new Error(`${this.side}: received message error: ${st.toString().slice(0, 500)}`));
                return;
            }
            const body = st.getChildText('body');
            if (body === null) return; // chat states etc.
            const err = this.rx.accept(body, from, () => st.toString());
            if (err) this.run.fail(new Error(err));
        } catch (e) {
            this.run.fail(new Error(`${this.side}: message handler error: ${e.message}`));
        }
    }

    async sendChat(n) {
        // To the peer's full (bound) JID by default, as bosh_chat.mjs does (a bare
        // JID fans out to stale sessions of the account too); --address bare tests
        // bare-JID routing.
        const to = this.opts.address === 'bare' ? this.peerBare : this.peer.jid;
        const message = () => xml('message', { to, type: 'chat', id: `${RUN_ID}-${this.side}-${n}` },
            xml('body', {}, makeBody(this.side, n)));
        this.sent++;
        // While this side's connection is down, hold the message (as an app would)
        // until the session is resumed.
        if (this.dropping) await this.waitResumed();
        try {
            await this.xmpp.send(message());
        } catch (e) {
            if (!this.drop) throw e;
            // The socket went away under this write. @xmpp/stream-management queues
            // a stanza for re-sending only once it has been written (its 'send'
            // event), so this one was not: the app sends it again once resumed.
            this.log(`message #${n} was not written (${e.message}); sending it again once the session is resumed`);
            await this.waitResumed();
            await this.xmpp.send(message());
        }
    }

    // -----------------------------------------------------------------------
    // --drop-at: lose the connection abruptly, let @xmpp/reconnect resume it
    // -----------------------------------------------------------------------

    /**
     * Destroy this side's socket without closing the stream (no
     * </stream:stream>, no TLS close_notify): the TCP connection is reset (RST)
     * where Node lets us (plain TCP, STARTTLS, ws://), otherwise destroyed (FIN;
     * direct TLS, whose TLSSocket owns its TCP handle). Then turn @xmpp/reconnect
     * on for this side: it reconnects a second later, authenticates again and,
     * because stream management is enabled with a session id, sends <resume/>
     * instead of binding a resource. onResumed() ends the drop; a <failed/>
     * answer (then a fresh session, 'online') or no resumption within
     * RESUME_LIMIT_MS fails the run.
     */
    dropConnection() {
        const xmpp = this.xmpp;
        const sm = xmpp.streamManagement;
        if (!sm.enabled || !sm.id) {
            this.run.fail(new Error(`${this.side}: cannot test resumption: stream management is not enabled `
                + `with a resumable session (enabled=${sm.enabled}, id=${JSON.stringify(sm.id)})`));
            return;
        }
        const raw = rawSocket(xmpp);
        if (!raw) {
            this.run.fail(new Error(`${this.side}: cannot drop the connection: no socket (status ${xmpp.status})`));
            return;
        }
        this.drop = {
            side: this.side,
            at_ms: this.run.elapsed(),
            how: null, // 'reset' (TCP RST) or 'destroy'
            previd: sm.id,
            h_at_drop: sm.inbound, // stanzas this side had handled
            reconnects: 0,
            resume_h: null, // h in our <resume/>
            server_h: null, // h in the server's <resumed/>
            resumed: false,
            resumed_at_ms: null,
            outage_ms: null,
            failed: null, // the condition in the server's <failed/>
            fresh_jid: null,
        };
        this.droppedAt = Date.now();
        this.dropping = true;
        xmpp.reconnect.start();
        // STARTTLS: the TLSSocket is layered on the original net.Socket (_parent).
        const tcp = raw._parent instanceof net.Socket ? raw._parent : raw;
        try {
            tcp.resetAndDestroy(); // throws ERR_INVALID_HANDLE_TYPE unless it owns a TCP handle
            this.drop.how = 'reset';
        } catch {
            raw.destroy();
            this.drop.how = 'destroy';
        }
        this.log(`DROP: connection ${this.drop.how === 'reset' ? 'reset (TCP RST)' : 'destroyed'} at +${this.drop.at_ms} ms `
            + `(sm id ${sm.id}, h=${this.drop.h_at_drop}, ${sm.outbound_q.length} unacked outbound)`);
        this.dropTimer = setTimeout(() => {
            if (this.dropping && !this.closing) {
                this.run.fail(new Error(this.describe(`${this.side}: not resumed within ${RESUME_LIMIT_MS} ms of the drop `
                    + `(${this.drop.reconnects} reconnect attempt(s))`)));
            }
        }, RESUME_LIMIT_MS);
        this.dropTimer.unref();
    }

    onResumed() {
        const d = this.drop;
        if (!d || d.resumed) return;
        d.resumed = true;
        d.resumed_at_ms = this.run.elapsed();
        d.outage_ms = Date.now() - this.droppedAt;
        this.dropping = false;
        clearTimeout(this.dropTimer);
        // Back to failing fast on any disconnect.
        this.xmpp.reconnect.stop();
        this.log(`RESUMED after ${d.outage_ms} ms (${d.reconnects} reconnect attempt(s), sent h=${d.resume_h}, `
            + `server h=${d.server_h}, ${this.xmpp.streamManagement.outbound_q.length} unacked outbound re-sent)`);
    }

    /** Resolve once the dropped session is resumed (at once if not dropped). */
    async waitResumed() {
        const left = Math.max(100, RESUME_LIMIT_MS - (Date.now() - (this.droppedAt ?? Date.now())));
        await this.run.waitFor(() => !this.dropping, left, `${this.side} to resume its session`);
    }

    /** Initial presence, then a ping round trip so the server has processed it. */
    async goOnline() {
        await this.xmpp.send(xml('presence'));
        try {
            await this.xmpp.iqCaller.request(
                xml('iq', { type: 'get', to: this.opts.domain }, xml('ping', { xmlns: NS_PING })), 15000);
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
        const el = await within(this.xmpp.stop(), 3 * this.opts.stepTimeoutMs + 1000, `${this.side} stop()`);
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

    /** Not offline or disconnected: what Run.finish() must close. */
    isOpen() {
        return !!(this.xmpp && !['offline', 'disconnect'].includes(this.xmpp.status));
    }

    /** No more reconnects once the run is over. */
    onFinish() {
        this.xmpp?.reconnect.stop();
    }

    /** Cleanup after a failure: stop(), bounded to 2 s. Resolves true if it finished. */
    async abort() {
        try {
            await within(this.xmpp.stop(), 2000, `${this.side} stop`);
            return true;
        } catch {
            return false;
        }
    }
}
