// Student view: record or upload an answer, watch it move through the two
// phases (live over SSE), then read the transcript and feedback.
import S, { locale } from './i18n.js';
import { h, clear, announce, notice, fmtBytes, fmtClock, fmtDate, fmtPoints, errorText, uid } from './ui.js';
import { recorder } from './recorder.js';

// ---- media with a clickable, timestamped transcript (shared with review) ----

function vtt(segments) {
  const t = (ms) => {
    const d = new Date(ms);
    return `${String(d.getUTCHours()).padStart(2, '0')}:${String(d.getUTCMinutes()).padStart(2, '0')}:${String(d.getUTCSeconds()).padStart(2, '0')}.${String(d.getUTCMilliseconds()).padStart(3, '0')}`;
  };
  return 'WEBVTT\n\n' + segments.map((s, i) => `${i + 1}\n${t(s.start_ms)} --> ${t(Math.max(s.end_ms, s.start_ms + 500))}\n${s.text.trim()}\n`).join('\n');
}

// Whisper's words below this probability are marked for reviewers
// (viva_models::payload::LOW_WORD_PROBABILITY).
const UNSURE = 0.5;

// A segment's text; for staff (`opts.staff`) the words Whisper was unsure of
// are marked, with how sure it was for screen readers and on hover.
function segmentText(s, staff) {
  const words = staff && Array.isArray(s.words) ? s.words : [];
  if (!words.some((w) => w.p < UNSURE)) return [s.text.trim()];
  return words.map((w, i) => {
    const text = i === 0 ? w.text.trimStart() : w.text;
    if (w.p >= UNSURE) return text;
    const lead = text.match(/^\s*/)[0];
    const label = S.unsureWord(Math.round(w.p * 100));
    return [lead, h('mark', { class: 'unsure', 'data-testid': 'unsure-word', title: label, 'data-p': w.p },
      text.slice(lead.length), h('span', { class: 'sr-only', text: ` (${label})` }))];
  });
}

// The transcript's language for captions: what Whisper decoded in, else the
// assignment's, else the page's.
const captionLang = (sub, lang) => (sub.transcript && sub.transcript.language) || lang || locale;

export function mediaPanel(api, sub, opts = {}) {
  const status = h('p', { class: 'muted', text: S.loadingMedia });
  const holder = h('div', { class: 'player' }, status);
  const segments = (sub.transcript && sub.transcript.segments) || [];
  const lang = captionLang(sub, opts.language);
  let player = null;
  const urls = [];
  const unsure = opts.staff && segments.some((s) => (s.words || []).some((w) => w.p < UNSURE));
  const lines = segments.map((s) => {
    const b = h('button', {
      type: 'button', class: 'seg', 'data-start': s.start_ms,
      on: { click: () => { if (player) { player.currentTime = s.start_ms / 1000; player.play().catch(() => {}); } } },
    }, h('span', { class: 'ts', text: fmtClock(s.start_ms) }), ' ', h('span', { lang }, segmentText(s, opts.staff)), s.low_confidence ? h('span', { class: 'muted', text: ' ' + S.lowConfidence }) : null);
    return h('li', {}, b);
  });
  const list = segments.length
    ? h('ol', { class: 'transcript', 'data-testid': 'transcript' }, lines)
    : h('p', { 'data-testid': 'transcript', text: (sub.transcript && sub.transcript.text) || S.noTranscript });
  const tid = uid('t');
  const el = h('section', { class: 'media', 'aria-labelledby': tid },
    h('h3', { id: tid, text: S.media }), holder,
    h('h3', { text: S.transcript }), segments.length ? h('p', { class: 'help', text: S.transcriptHelp }) : null,
    unsure ? h('p', { class: 'help', 'data-testid': 'unsure-help', text: S.unsureWordsHelp }) : null, list);
  if (sub.media_available !== false) {
    api.mediaUrl(sub.id).then((m) => {
      urls.push(m.url);
      const isVideo = (m.type || '').startsWith('video');
      player = h(isVideo ? 'video' : 'audio', { controls: true, src: m.url, preload: 'metadata', 'data-testid': 'player', 'data-preview': m.how || '' });
      if (segments.length) {
        const cap = URL.createObjectURL(new Blob([vtt(segments)], { type: 'text/vtt' }));
        urls.push(cap);
        player.append(h('track', { kind: 'captions', srclang: lang, label: S.transcript, src: cap, default: true }));
      }
      player.addEventListener('timeupdate', () => {
        const ms = player.currentTime * 1000;
        segments.forEach((s, i) => {
          const on = ms >= s.start_ms && ms < s.end_ms;
          const b = lines[i].firstChild;
          if (on) b.setAttribute('aria-current', 'true'); else b.removeAttribute('aria-current');
        });
      });
      clear(holder, player);
    }).catch((e) => { status.textContent = S.mediaUnavailable(errorText(e)); });
  } else {
    status.textContent = S.mediaUnavailable(S.mediaDeleted);
  }
  el.dispose = () => urls.forEach((u) => URL.revokeObjectURL(u));
  return el;
}

// ---- the per-criterion results table (students; review shows more) ----

// A stored score is {total, max, needs_review, reasons, report: {criteria,
// feedback, plugin, usage}}; older or hand-made ones may be the bare report.
export const reportOf = (score) => (score && score.report) || score || {};

export function resultsTable(assignment, score) {
  const byId = Object.fromEntries((reportOf(score).criteria || []).map((c) => [c.criterion_id, c]));
  const rows = assignment.rubric.criteria.map((c) => {
    const s = byId[c.id] || {};
    const max = Math.max(...c.levels.map((l) => l.points));
    return h('tr', {}, h('th', { scope: 'row' }, c.title), h('td', { 'data-label': S.levelCol, text: s.level || '—' }),
      h('td', { 'data-label': S.points, text: `${fmtPoints(s.points || 0)} / ${fmtPoints(max)}${c.weight !== 1 ? ` ×${fmtPoints(c.weight)}` : ''}` }),
      h('td', { 'data-label': S.feedback, class: 'pre', text: s.feedback || '' }));
  });
  return h('div', { class: 'table-wrap' }, h('table', { class: 'stack', 'data-testid': 'criteria' },
    h('caption', { text: S.criteria }),
    h('thead', {}, h('tr', {}, [S.criterion, S.levelCol, S.points, S.feedback].map((x) => h('th', { scope: 'col', text: x })))),
    h('tbody', {}, rows)));
}

// ---- the view ----

const SETTLED = ['released', 'awaiting_review', 'failed'];

export function mount(panel, ctx) {
  const { api, data } = ctx;
  const limits = data.limits || {};
  let disposers = [];
  const dispose = () => { disposers.forEach((f) => f()); disposers = []; };
  const body = h('div', { class: 'student' });
  panel.append(body);
  let assignment = null;

  async function start() {
    let id = ctx.assignmentId;
    try {
      if (!id) {
        const list = await api.get('/api/v1/assignments');
        if (!list.length) { clear(body, notice('info', S.noAssignmentStudent)); return; }
        if (list.length > 1) {
          const sel = h('select', { id: uid('a') }, list.map((a) => h('option', { value: a.id, text: a.title })));
          sel.addEventListener('change', () => { ctx.assignmentId = sel.value; dispose(); start(); });
          body.before(h('div', { class: 'field' }, h('label', { for: sel.id, text: S.chooseAssignment }), sel));
          ctx.assignmentId = list[0].id;
          sel.value = list[0].id;
          return start();
        }
        id = list[0].id;
      }
      assignment = await api.get(`/api/v1/assignments/${encodeURIComponent(id)}`);
      const title = document.getElementById('viva-title');
      if (title) title.textContent = assignment.title;
      const subs = await api.get(`/api/v1/assignments/${encodeURIComponent(id)}/submissions`);
      const latest = subs.sort((a, b) => b.attempt - a.attempt)[0];
      if (latest && latest.state !== 'failed') showSubmission(latest);
      else showForm(latest);
    } catch (e) {
      clear(body, notice('error', S.loadFailed(errorText(e))), h('button', { type: 'button', text: S.tryAgain, on: { click: start } }));
    }
  }

  function prompt() {
    return h('section', { class: 'prompt', 'aria-label': S.question }, h('p', { id: 'prompt', text: assignment.prompt }));
  }

  // ---- submitting ----
  function showForm(failed) {
    dispose();
    const failedBox = failed ? failureBox(failed, false) : null;
    const modeName = uid('mode');
    const mRec = h('input', { type: 'radio', name: modeName, id: uid('r'), value: 'record', checked: true, 'data-testid': 'mode-record' });
    const mUp = h('input', { type: 'radio', name: modeName, id: uid('r'), value: 'upload', 'data-testid': 'mode-upload' });
    const modes = h('fieldset', { class: 'choice modes' }, h('legend', { text: S.howToAnswer }),
      h('div', {}, mRec, h('label', { for: mRec.id, text: S.modeRecord })),
      h('div', {}, mUp, h('label', { for: mUp.id, text: S.modeUpload })));
    const area = h('div', { class: 'answer-area' });
    const progress = h('div', { class: 'upload', hidden: true });
    let current = null;
    const choose = () => {
      if (current && current.dispose) current.dispose();
      current = mRec.checked ? recorder(limits, send) : uploader(send);
      clear(area, current);
    };
    mRec.addEventListener('change', choose);
    mUp.addEventListener('change', choose);
    disposers.push(() => { if (current && current.dispose) current.dispose(); });
    clear(body, prompt(), failedBox, h('h2', { text: S.yourAnswer }), modes, area, progress);
    choose();

    async function send(blob, filename, key = uploadKey()) {
      const bar = h('progress', { max: '100', value: '0', 'aria-label': S.uploadProgress, 'data-testid': 'upload-progress' });
      const label = h('p', { 'aria-live': 'polite', text: S.uploading(0) });
      clear(progress, label, bar);
      progress.hidden = false;
      area.querySelectorAll('button').forEach((b) => { b.disabled = true; });
      let lastPct = -1;
      try {
        const sub = await api.upload(assignment.id, blob, filename, (done, total) => {
          const pct = Math.floor((done / total) * 100);
          bar.value = pct;
          if (pct !== lastPct && pct % 10 === 0) label.textContent = S.uploading(pct);
          lastPct = pct;
        }, key);
        bar.value = 100;
        announce(S.uploadedOk);
        showSubmission(sub, true);
      } catch (e) {
        area.querySelectorAll('button').forEach((b) => { b.disabled = false; });
        if (e.code === 'network') {
          const retry = h('button', { type: 'button', class: 'primary', 'data-testid': 'upload-retry', text: S.retryUpload, on: { click: () => send(blob, filename, key) } });
          clear(progress, notice('error', S.uploadInterrupted), retry);
          retry.focus();
        } else if (e.status === 429) {
          // A fair-use limit that passes with time: keep the recording.
          const retry = h('button', { type: 'button', class: 'primary', 'data-testid': 'upload-retry', text: S.retryUpload, on: { click: () => send(blob, filename, key) } });
          clear(progress, notice('error', S.uploadLater(e.message)), retry);
        } else {
          clear(progress, notice('error', S.uploadRefused(e.message)));
        }
        announce(e.message, true);
      }
    }
  }

  // One random key per recording (crypto.getRandomValues works on plain
  // http too, unlike randomUUID).
  function uploadKey() {
    const b = new Uint8Array(16);
    crypto.getRandomValues(b);
    return Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
  }

  function uploader(send) {
    const accepted = limits.accepted || ['mp4', 'webm', 'mov', 'mkv', 'wav', 'mp3', 'm4a', 'ogg', 'opus', 'flac'];
    const input = h('input', { type: 'file', id: uid('file'), 'data-testid': 'file-input', accept: ['video/*', 'audio/*', ...accepted.map((e) => '.' + e)].join(',') });
    const msg = h('div', { 'aria-live': 'polite', 'data-testid': 'file-status' });
    const go = h('button', { type: 'button', class: 'primary', 'data-testid': 'file-submit', text: S.submitFile, disabled: true });
    let file = null;
    const check = (f) => {
      file = null;
      go.disabled = true;
      const ext = (f.name.split('.').pop() || '').toLowerCase();
      let err = null;
      if (!accepted.includes(ext) && !/^(video|audio)\//.test(f.type)) err = S.badType(accepted.join(', '));
      else if (f.size === 0) err = S.emptyFile;
      else if (limits.max_upload_bytes && f.size > limits.max_upload_bytes) err = S.tooBig(fmtBytes(f.size), fmtBytes(limits.max_upload_bytes));
      if (err) { clear(msg, notice('error', err)); announce(err, true); return; }
      file = f;
      go.disabled = false;
      clear(msg, h('p', { text: S.fileChosen(f.name, fmtBytes(f.size)) }));
    };
    input.addEventListener('change', () => { if (input.files[0]) check(input.files[0]); });
    const zone = h('div', { class: 'dropzone', 'data-testid': 'dropzone' },
      h('p', { text: S.dropHere }), h('label', { for: input.id, class: 'button', text: S.chooseFile }), input);
    zone.addEventListener('dragover', (e) => { e.preventDefault(); zone.classList.add('over'); });
    zone.addEventListener('dragleave', () => zone.classList.remove('over'));
    zone.addEventListener('drop', (e) => {
      e.preventDefault();
      zone.classList.remove('over');
      if (e.dataTransfer.files[0]) check(e.dataTransfer.files[0]);
    });
    go.addEventListener('click', () => { if (file) send(file, file.name); });
    return h('div', { class: 'uploader' }, zone, msg, h('div', { class: 'buttons' }, go));
  }

  // ---- waiting and results ----
  function failureBox(sub, withButton = true) {
    return h('div', { class: 'notice error', role: 'alert', 'data-testid': 'failure' },
      h('h2', { text: S.failedTitle }), h('p', { text: sub.failure_reason || '' }), h('p', { text: S.failedWhat }),
      withButton ? h('button', { type: 'button', class: 'primary', text: S.submitAgain, on: { click: () => showForm(null) } }) : null);
  }

  function showSubmission(sub, fresh = false) {
    dispose();
    if (sub.state === 'failed') { showForm(sub); return; }
    if (sub.state === 'released' || sub.state === 'awaiting_review') { showResult(sub); return; }
    const phaseItems = [
      ['stt', S.phaseStt], ['evaluation', S.phaseEval], ['done', S.phaseResult],
    ].map(([id, label]) => h('li', { 'data-phase': id }, h('span', { class: 'label', text: label }), h('span', { class: 'sr-only state' })));
    const sysHead = h('h2', { 'data-testid': 'system-phase' });
    const phases = h('ol', { class: 'phase-indicator', 'aria-label': S.phases, 'data-testid': 'phases' }, phaseItems);
    const uploaded = h('li', { text: fresh ? S.uploadedOk : S.uploadedAt(fmtDate(sub.created_at)) });
    const pos = h('li', { 'data-testid': 'position' });
    const eta = h('li', { 'data-testid': 'eta' });
    const then = h('li', { 'data-testid': 'then' });
    const paused = h('li', { 'data-testid': 'paused', class: 'reason', hidden: true });
    const user = h('ul', { class: 'user-status' }, uploaded, pos, eta, then, paused);
    const bTitle = h('p', { 'data-testid': 'batch-title' });
    const bBar = h('progress', { max: '1', value: '0', 'aria-label': S.batchLabel });
    const bText = h('p', { 'data-testid': 'batch-progress' });
    const batch = h('div', { class: 'batch-progress', hidden: true }, bTitle, bBar, bText);
    const conn = h('p', { class: 'muted', 'aria-live': 'polite' });
    clear(body, prompt(), h('section', { class: 'processing-status', 'data-testid': 'status' }, sysHead, phases, user, batch, conn));
    let lastPhase = null, lastPos = null;
    const update = (ev) => {
      const phase = ev.phase || 'stt';
      sysHead.textContent = S.systemStatus(S.systemPhase[ev.system_phase] || ev.system_phase);
      const order = ['stt', 'evaluation', 'done'];
      const at = phase === 'scoring' ? 1 : Math.max(0, order.indexOf(phase));
      phaseItems.forEach((li, i) => {
        li.className = i === at ? 'active' : i < at ? 'done' : 'pending';
        if (i === at) li.setAttribute('aria-current', 'step'); else li.removeAttribute('aria-current');
        li.querySelector('.state').textContent = i === at ? ' ' + S.phaseCurrent : i < at ? ' ' + S.phaseDone : '';
      });
      const qn = S.queueName[phase] || phase;
      pos.textContent = ev.position ? S.position(ev.position, qn) : phase === 'scoring' ? S.scoringNow : '';
      pos.hidden = !pos.textContent;
      eta.textContent = ev.eta_seconds == null ? '' : ev.eta_seconds < 60 ? S.etaSoon : S.eta(S.duration(ev.eta_seconds));
      // A paused submission has no honest ETA: its model must start first.
      eta.hidden = !eta.textContent || !!ev.paused;
      then.textContent = phase === 'stt' ? S.thenEvaluation : '';
      then.hidden = !then.textContent;
      paused.textContent = ev.paused || '';
      paused.hidden = !ev.paused;
      const b = ev.batch;
      batch.hidden = !(b && phase === 'stt');
      if (b) {
        bTitle.textContent = S.batchTitle(b.size);
        bBar.max = Math.max(1, b.size);
        bBar.value = b.stt_done;
        bText.textContent = S.batchProgress(b.stt_done, b.size);
      }
      if (lastPhase && phase !== lastPhase) announce(S.announcePhase(S.queueName[phase] || phase));
      else if (ev.position && lastPos && ev.position !== lastPos) announce(S.announcePosition(ev.position, qn));
      lastPhase = phase;
      lastPos = ev.position;
    };
    update({
      phase: sub.phase, system_phase: sub.system_phase, position: sub.queue && sub.queue.position,
      eta_seconds: sub.queue && sub.queue.eta_seconds, batch: sub.batch, paused: sub.queue && sub.queue.paused,
    });
    const s = api.stream(`/api/v1/events?submission=${encodeURIComponent(sub.id)}`, (name, ev) => {
      if (name === 'status') update(ev);
      if (name === 'done') {
        api.get(`/api/v1/submissions/${encodeURIComponent(sub.id)}`).then((fresh) => {
          if (SETTLED.includes(fresh.state)) showSubmission(fresh);
          else { update({ ...ev, phase: 'scoring' }); poll(sub.id, SETTLED); }
        }).catch(() => poll(sub.id, SETTLED));
        return 'stop';
      }
      return null;
    }, (state, err) => {
      if (state === 'lost') conn.textContent = S.reconnecting;
      if (state === 'open') {
        conn.textContent = S.reconnected;
        api.get(`/api/v1/submissions/${encodeURIComponent(sub.id)}`).then((fresh) => {
          if (SETTLED.includes(fresh.state)) showSubmission(fresh);
        }).catch(() => {});
      }
      if (state === 'fatal') conn.replaceChildren(notice('error', err.message));
    });
    disposers.push(() => s.close());
  }

  // Polls until the submission reaches one of `states` (release is not on the stream).
  function poll(id, states) {
    const t = setInterval(async () => {
      try {
        const fresh = await api.get(`/api/v1/submissions/${encodeURIComponent(id)}`);
        if (states.includes(fresh.state)) { clearInterval(t); showSubmission(fresh); }
      } catch (_) { /* keep polling */ }
    }, 5000);
    disposers.push(() => clearInterval(t));
  }

  function showResult(sub) {
    const media = mediaPanel(api, sub);
    disposers.push(media.dispose);
    const parts = [prompt()];
    if (sub.state === 'awaiting_review') {
      parts.push(h('div', { class: 'notice info', 'data-testid': 'awaiting-review' }, h('h2', { text: S.results }), h('p', { text: S.awaitingReview })));
      poll(sub.id, ['released', 'failed']);
    } else if (sub.score) {
      const sc = sub.score;
      parts.push(h('section', { class: 'result', 'data-testid': 'result' },
        h('h2', { text: S.results }),
        h('p', { class: 'total', 'data-testid': 'total' }, h('strong', { text: S.total + ': ' }), S.totalOf(fmtPoints(sc.total), fmtPoints(sc.max))),
        resultsTable(assignment, sc),
        reportOf(sc).feedback ? h('div', {}, h('h3', { text: S.overallFeedback }), h('p', { class: 'pre', text: reportOf(sc).feedback })) : null));
    }
    parts.push(media);
    clear(body, ...parts);
    announce(sub.state === 'released' ? S.released : S.awaitingReview);
  }

  start();
  return dispose;
}
