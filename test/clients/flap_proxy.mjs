#!/usr/bin/env node
// Loopback TCP proxy that simulates a short server-side restart, for exercising
// bosh_chat.mjs --mode live against a server that cannot itself be restarted
// without losing its BOSH sessions (e.g. ejabberd's own mod_bosh).
//
// At each time in --flap-at (seconds after start) it closes its listening socket
// and resets (or, with --close fin, ends) every proxied connection, like a killed
// process; for --down-ms new connections are refused; then it listens again.
// It exits by itself after --lifetime seconds (or on SIGTERM/SIGINT).
//
//   node flap_proxy.mjs --listen 15281 --target 127.0.0.1:15280 \
//        --flap-at 5,12 --down-ms 1500 --lifetime 60
//
// Only loopback addresses are accepted for --listen-host and --target.
import net from 'node:net';
import { parseArgs } from 'node:util';

const { values } = parseArgs({
    options: {
        listen: { type: 'string' },
        'listen-host': { type: 'string', default: '127.0.0.1' },
        target: { type: 'string' },
        'flap-at': { type: 'string', default: '' },
        'down-ms': { type: 'string', default: '1500' },
        close: { type: 'string', default: 'rst' },
        lifetime: { type: 'string', default: '120' },
    },
});

const isLoopback = (h) => h === 'localhost' || h === '::1' || /^127\.\d+\.\d+\.\d+$/.test(h);
const listenPort = Number(values.listen);
const [targetHost, targetPortStr] = String(values.target || '').split(/:(?=\d+$)/);
const targetPort = Number(targetPortStr);
const downMs = Number(values['down-ms']);
const lifetimeS = Number(values.lifetime);
const flapAt = values['flap-at'] ? values['flap-at'].split(',').map(Number) : [];
if (!(listenPort > 0) || !(targetPort > 0) || !isLoopback(targetHost) || !isLoopback(values['listen-host'])
    || !(downMs >= 0) || !(lifetimeS > 0 && lifetimeS <= 3600) || flapAt.some((t) => !(t >= 0)) || flapAt.length > 100
    || !['rst', 'fin'].includes(values.close)) {
    process.stderr.write('usage: flap_proxy.mjs --listen PORT --target 127.0.0.1:PORT [--flap-at S,S] [--down-ms MS] [--close rst|fin] [--lifetime S]\n');
    process.exit(2);
}

const t0 = Date.now();
const log = (m) => process.stderr.write(`[flap_proxy +${((Date.now() - t0) / 1000).toFixed(3)}s] ${m}\n`);
const live = new Set();
let server = null;
let flaps = 0;
let conns = 0;

function kill(sock) {
    if (values.close === 'rst' && typeof sock.resetAndDestroy === 'function') sock.resetAndDestroy();
    else sock.destroy(); // FIN, like a process whose sockets the kernel closes
}

function startListening() {
    server = net.createServer((client) => {
        conns++;
        const upstream = net.connect(targetPort, targetHost);
        const pair = [client, upstream];
        for (const s of pair) {
            live.add(s);
            s.on('error', () => {});
            s.on('close', () => {
                live.delete(s);
                for (const o of pair) if (o !== s && !o.destroyed) o.destroy();
            });
        }
        client.pipe(upstream);
        upstream.pipe(client);
    });
    server.on('error', (e) => {
        log(`listen error: ${e.message}`);
        process.exit(1);
    });
    server.listen(listenPort, values['listen-host'], () => log(`listening on ${values['listen-host']}:${listenPort} -> ${targetHost}:${targetPort}`));
}

function flap() {
    flaps++;
    const n = live.size;
    log(`FLAP ${flaps}: closing listener and ${values.close === 'rst' ? 'resetting' : 'closing'} ${n} sockets; down for ${downMs} ms`);
    server.close();
    server = null;
    for (const s of [...live]) kill(s);
    setTimeout(() => {
        log(`FLAP ${flaps}: back up`);
        startListening();
    }, downMs);
}

startListening();
for (const t of flapAt) setTimeout(flap, t * 1000);
const stop = (why) => {
    log(`exiting (${why}); ${conns} connections proxied, ${flaps} flaps`);
    process.exit(0);
};
setTimeout(() => stop('lifetime'), lifetimeS * 1000);
process.on('SIGTERM', () => stop('SIGTERM'));
process.on('SIGINT', () => stop('SIGINT'));
process.on('SIGUSR1', () => (server ? flap() : log('SIGUSR1 ignored: already down')));
