// Browser-ish globals that Strophe.js 5 needs when it runs under Node.
//
// What Strophe 5 needs (read from node_modules/strophe.js/dist/strophe.node.esm.js
// and src/request.ts, src/utils.ts):
//
//  * DOMParser, XMLSerializer, document (document.implementation.createDocument
//    is used by Strophe.xmlGenerator()), and WebSocket.  Strophe 5's *Node* entry
//    point (package.json "exports" -> "node" -> "import": dist/strophe.node.esm.js)
//    installs all of these itself from @xmldom/xmldom and ws as a side effect of
//    being imported (src/shims/node-dom.ts).  That is why @xmldom/xmldom and ws
//    must be installed even though they are only "optional peer" dependencies:
//    the Node build imports them unconditionally.  We still check for them below
//    and fill in any that are missing from xmldom, so that this file keeps working
//    if the browser build were ever resolved instead.
//
//  * XMLHttpRequest, for the BOSH transport (src/request.ts `new XMLHttpRequest()`).
//    Strophe does NOT provide this under Node.  We use xhr2, which has no
//    `responseXML`.  Strophe's Request.getResponse() reads
//    `xhr.responseXML.documentElement`; when responseXML is missing it only parses
//    responseText to *detect* errors and then returns null, and a null body is
//    silently ignored by Connection._dataRecv(), i.e. without responseXML every
//    BOSH response would be dropped.  So we add a `responseXML` getter that parses
//    responseText with @xmldom/xmldom's DOMParser.
//
//  * xhr2 reports a network error that happens *after* the response headers
//    arrived (connection reset mid-body, e.g. when the server is killed) with
//    readyState 4 and the HTTP status it had already seen (e.g. 200) plus an
//    empty body.  Strophe would take that for a successful, empty response, ack
//    the rid and lose whatever the server had sent in it.  A browser reports any
//    network error as status 0, which Strophe retries with the same rid.  We
//    make xhr2 do the same (status 0 on every error path), see _setError below.
//
// Import this module before using Strophe; it re-exports Strophe's API.

import XHR2 from 'xhr2';
import http from 'node:http';
import {
    DOMImplementation,
    DOMParser as XmldomDOMParser,
    XMLSerializer as XmldomXMLSerializer,
} from '@xmldom/xmldom';
import { Strophe, $iq, $msg, $pres, $build } from 'strophe.js';

const PARSE_ERROR_NS = 'http://www.w3.org/1999/xhtml';
const domImplementation = new DOMImplementation();

/**
 * Parse an XML string strictly with xmldom.  On a fatal parse error return a
 * document whose root is <parsererror/> (what browsers used to do and what
 * Strophe's getResponse() checks for), so Strophe reports 'parsererror'
 * instead of silently dropping the response.
 */
export function parseXml(text) {
    try {
        const parser = new XmldomDOMParser({
            onError(level, message) {
                if (level === 'fatalError') {
                    throw new Error(typeof message === 'string' ? message : String(message));
                }
            },
        });
        return parser.parseFromString(text, 'text/xml');
    } catch (e) {
        const doc = domImplementation.createDocument(PARSE_ERROR_NS, 'parsererror', null);
        doc.documentElement.appendChild(doc.createTextNode(String(e && e.message)));
        return doc;
    }
}

/** xhr2's XMLHttpRequest plus `responseXML` and browser-like status on errors. */
export class NodeXMLHttpRequest extends XHR2 {
    get responseXML() {
        // Like a browser: only a finished request with a body has a document.
        if (this.readyState !== 4 || this.status === 0) return null;
        const text = this.responseText;
        if (typeof text !== 'string' || text.length === 0) return null;
        if (this._mpXmlFor !== text) {
            this._mpXmlDoc = parseXml(text);
            this._mpXmlFor = text;
        }
        return this._mpXmlDoc;
    }

    // xhr2 calls _setError() on every network error / abort / timeout path.
    _setError() {
        super._setError();
        this.status = 0;
        this.statusText = '';
        this.responseText = '';
        this.response = '';
    }
}

/**
 * Make every BOSH request leave from localAddress (e.g. 127.0.0.2), so a test
 * can tell the client's address apart from the sidecar's own (127.0.0.1).
 */
export function useLocalAddress(localAddress) {
    NodeXMLHttpRequest.nodejsSet({ httpAgent: new http.Agent({ keepAlive: true, localAddress }) });
}

let installed = false;

/** Install the globals (idempotent). Returns the list of globals we had to add. */
export function installGlobals() {
    const added = [];
    if (!installed) {
        globalThis.XMLHttpRequest = NodeXMLHttpRequest;
        added.push('XMLHttpRequest');
        installed = true;
    }
    if (typeof globalThis.DOMParser === 'undefined') {
        globalThis.DOMParser = class DOMParser {
            parseFromString(text) {
                return parseXml(text);
            }
        };
        added.push('DOMParser');
    }
    if (typeof globalThis.XMLSerializer === 'undefined') {
        globalThis.XMLSerializer = XmldomXMLSerializer;
        added.push('XMLSerializer');
    }
    if (typeof globalThis.document === 'undefined') {
        globalThis.document = domImplementation.createDocument(null, null, null);
        added.push('document');
    }
    return added;
}

installGlobals();

export { Strophe, $iq, $msg, $pres, $build };
