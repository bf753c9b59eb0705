// The daemon's API: JSON requests with the bearer token, uploads with
// progress, live status over fetch-streamed SSE (EventSource cannot send the
// token, and LMS iframes block cookies) with reconnection, and media through
// single-use tickets.
import S from './i18n.js';

export class ApiError extends Error {
  constructor(message, status, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function errorOf(resp) {
  let code = 'http_' + resp.status, message = `HTTP ${resp.status}`;
  try {
    const j = await resp.json();
    if (j && j.error) { code = j.error.code || code; message = j.error.message || message; }
  } catch (_) { /* not JSON */ }
  if (resp.status === 401) message = S.sessionExpired;
  return new ApiError(message, resp.status, code);
}

export class Api {
  constructor(token) {
    this.token = token;
  }

  auth(extra = {}) {
    return { Authorization: `Bearer ${this.token}`, ...extra };
  }

  async req(method, path, body, headers = {}) {
    const init = { method, headers: this.auth(headers), cache: 'no-store' };
    if (body !== undefined) {
      if (body instanceof Blob || body instanceof ArrayBuffer) init.body = body;
      else { init.body = JSON.stringify(body); init.headers['Content-Type'] = 'application/json'; }
    }
    let resp;
    try {
      resp = await fetch(path, init);
    } catch (e) {
      throw new ApiError(S.networkDown, 0, 'network');
    }
    if (!resp.ok) throw await errorOf(resp);
    if (resp.status === 204) return null;
    const ct = resp.headers.get('content-type') || '';
    return ct.includes('json') ? resp.json() : resp.text();
  }

  get(path) { return this.req('GET', path); }
  post(path, body = {}) { return this.req('POST', path, body); }
  put(path, body) { return this.req('PUT', path, body); }
  del(path) { return this.req('DELETE', path); }

  // Uploads a Blob/File as the raw body with upload progress (XHR: fetch
  // has no upload progress). Resolves with the submission; rejects with an
  // ApiError whose code is 'network' when the connection dropped (the caller
  // keeps the blob and offers a retry).
  // `key` (the Idempotency-Key) is one random value per recording, sent
  // again with every retry: a retry of an upload that did land returns that
  // submission instead of making a second one.
  upload(assignmentId, blob, filename, onProgress, key) {
    return new Promise((resolve, reject) => {
      const xhr = new XMLHttpRequest();
      const url = `/api/v1/assignments/${encodeURIComponent(assignmentId)}/submissions?filename=${encodeURIComponent(filename)}`;
      xhr.open('POST', url);
      xhr.setRequestHeader('Authorization', `Bearer ${this.token}`);
      xhr.setRequestHeader('Content-Type', blob.type || 'application/octet-stream');
      if (key) xhr.setRequestHeader('Idempotency-Key', key);
      xhr.responseType = 'json';
      xhr.upload.onprogress = (e) => { if (e.lengthComputable) onProgress(e.loaded, e.total); };
      xhr.onerror = () => reject(new ApiError(S.uploadInterrupted, 0, 'network'));
      xhr.ontimeout = xhr.onerror;
      xhr.onabort = xhr.onerror;
      xhr.onload = () => {
        const j = xhr.response;
        if (xhr.status >= 200 && xhr.status < 300) return resolve(j);
        if (xhr.status >= 500 || xhr.status === 0) return reject(new ApiError(S.uploadInterrupted, xhr.status, 'network'));
        const msg = xhr.status === 401 ? S.sessionExpired : (j && j.error && j.error.message) || `HTTP ${xhr.status}`;
        reject(new ApiError(msg, xhr.status, (j && j.error && j.error.code) || 'http'));
      };
      xhr.send(blob);
    });
  }

  async ticket(scope) {
    return (await this.post('/api/v1/tickets', { scope })).ticket;
  }

  // The submission's playable media as a blob: URL, fetched once with a
  // single-use media ticket (no token in any URL; blob URLs seek freely).
  async mediaUrl(submissionId) {
    const t = await this.ticket(`media:${submissionId}`);
    const resp = await fetch(`/api/v1/submissions/${encodeURIComponent(submissionId)}/preview?ticket=${encodeURIComponent(t)}`, { cache: 'no-store' });
    if (!resp.ok) throw await errorOf(resp);
    const blob = await resp.blob();
    return { url: URL.createObjectURL(blob), type: blob.type, how: resp.headers.get('x-viva-preview') };
  }

  // Server-sent events over fetch with the bearer token. Calls
  // onEvent(name, data) per event; reconnects with backoff until close() or
  // an event for which onEvent returns 'stop'. onConnection(state) gets
  // 'open' | 'lost'.
  stream(path, onEvent, onConnection = () => {}) {
    let closed = false, ctrl = null, delay = 1000, lost = false;
    const run = async () => {
      while (!closed) {
        ctrl = new AbortController();
        try {
          const resp = await fetch(path, { headers: this.auth({ Accept: 'text/event-stream' }), signal: ctrl.signal, cache: 'no-store' });
          if (resp.status === 401 || resp.status === 404 || resp.status === 403) {
            onConnection('fatal', await errorOf(resp));
            return;
          }
          if (!resp.ok || !resp.body) throw new Error(`HTTP ${resp.status}`);
          if (lost) { lost = false; onConnection('open'); }
          delay = 1000;
          const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
          let buf = '';
          for (;;) {
            const { value, done } = await reader.read();
            if (done) break;
            buf += value;
            let i;
            while ((i = buf.search(/\r?\n\r?\n/)) >= 0) {
              const block = buf.slice(0, i);
              buf = buf.slice(i).replace(/^\r?\n\r?\n/, '');
              let name = 'message', data = '';
              for (const line of block.split(/\r?\n/)) {
                if (line.startsWith('event:')) name = line.slice(6).trim();
                else if (line.startsWith('data:')) data += (data ? '\n' : '') + line.slice(5).replace(/^ /, '');
              }
              if (!data) continue;
              let parsed;
              try { parsed = JSON.parse(data); } catch (_) { parsed = data; }
              if (onEvent(name, parsed) === 'stop') { closed = true; ctrl.abort(); return; }
            }
          }
        } catch (e) {
          if (closed) return;
        }
        if (closed) return;
        if (!lost) { lost = true; onConnection('lost'); }
        await new Promise((r) => setTimeout(r, delay));
        delay = Math.min(delay * 2, 15000);
      }
    };
    run();
    return { close() { closed = true; if (ctrl) ctrl.abort(); } };
  }
}
