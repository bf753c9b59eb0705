// Recording in the browser: camera+microphone or microphone only, a level
// meter, a countdown, a timer, preview and re-record. Calls onReady(blob,
// filename) when the student submits the recording.
import S from './i18n.js';
import { h, clear, announce, notice, fmtClock, uid } from './ui.js';

function pickType(video) {
  const list = video
    ? ['video/webm;codecs=vp8,opus', 'video/webm;codecs=vp9,opus', 'video/webm', 'video/mp4']
    : ['audio/webm;codecs=opus', 'audio/webm', 'audio/ogg;codecs=opus', 'audio/mp4'];
  return list.find((t) => window.MediaRecorder && MediaRecorder.isTypeSupported(t)) || '';
}

export function recorder(limits, onReady) {
  const name = uid('kind');
  const optVideo = h('input', { type: 'radio', name, id: uid('r'), value: 'video', checked: true });
  const optAudio = h('input', { type: 'radio', name, id: uid('r'), value: 'audio' });
  const kind = h('fieldset', { class: 'choice' }, h('legend', { text: S.recordWhat }),
    h('div', {}, optVideo, h('label', { for: optVideo.id, text: S.recordVideo })),
    h('div', {}, optAudio, h('label', { for: optAudio.id, text: S.recordAudio })));
  const start = h('button', { type: 'button', class: 'primary', 'data-testid': 'record-start', text: S.startRecording });
  const stop = h('button', { type: 'button', class: 'danger', 'data-testid': 'record-stop', text: S.stopRecording, hidden: true });
  const again = h('button', { type: 'button', 'data-testid': 'record-again', text: S.recordAgain, hidden: true });
  const submit = h('button', { type: 'button', class: 'primary', 'data-testid': 'record-submit', text: S.submitRecording, hidden: true });
  const say = h('p', { class: 'record-status', 'data-testid': 'record-status', 'aria-live': 'polite' });
  const meterId = uid('m');
  const meter = h('meter', { id: meterId, min: '0', max: '1', value: '0', 'aria-label': S.level });
  const meterWrap = h('div', { class: 'meter', hidden: true }, h('label', { for: meterId, text: S.level }), meter);
  const stage = h('div', { class: 'stage' });
  const maxMs = (limits.max_duration_seconds || 1800) * 1000;
  let stream = null, rec = null, chunks = [], started = 0, timer = null, raf = 0, audioCtx = null, url = null, blob = null;

  function stopStream() {
    cancelAnimationFrame(raf);
    clearInterval(timer);
    if (audioCtx) { audioCtx.close().catch(() => {}); audioCtx = null; }
    if (stream) { stream.getTracks().forEach((t) => t.stop()); stream = null; }
    meterWrap.hidden = true;
  }

  function levelLoop(analyser) {
    const buf = new Uint8Array(analyser.fftSize);
    const tick = () => {
      analyser.getByteTimeDomainData(buf);
      let peak = 0;
      for (const v of buf) peak = Math.max(peak, Math.abs(v - 128) / 128);
      meter.value = Math.min(1, peak * 1.5);
      raf = requestAnimationFrame(tick);
    };
    tick();
  }

  async function begin() {
    if (!navigator.mediaDevices || !window.MediaRecorder) {
      say.replaceChildren(notice('error', S.noMediaDevices));
      return;
    }
    const video = optVideo.checked;
    start.disabled = true;
    try {
      stream = await navigator.mediaDevices.getUserMedia(video
        ? { audio: true, video: { width: { ideal: 640 }, height: { ideal: 360 } } }
        : { audio: true });
    } catch (e) {
      start.disabled = false;
      const msg = e && e.name === 'NotAllowedError' ? S.permissionDenied
        : e && e.name === 'NotFoundError' ? S.noDevice : S.recorderFailed(e.message || e.name);
      say.replaceChildren(notice('error', msg));
      announce(msg, true);
      return;
    }
    if (url) { URL.revokeObjectURL(url); url = null; }
    const live = video ? h('video', { class: 'preview', muted: true, autoplay: true, playsinline: true, 'aria-label': S.livePreview }) : null;
    if (live) { live.muted = true; live.srcObject = stream; }
    clear(stage, live);
    try {
      audioCtx = new AudioContext();
      const analyser = audioCtx.createAnalyser();
      analyser.fftSize = 1024;
      audioCtx.createMediaStreamSource(stream).connect(analyser);
      meterWrap.hidden = false;
      levelLoop(analyser);
    } catch (_) { /* no meter, recording still works */ }
    for (let n = 3; n > 0; n--) {
      say.textContent = S.countdown(n);
      await new Promise((r) => setTimeout(r, 1000));
      if (!stream) return;
    }
    const type = pickType(video);
    try {
      rec = new MediaRecorder(stream, type ? { mimeType: type } : undefined);
    } catch (e) {
      stopStream();
      start.disabled = false;
      say.replaceChildren(notice('error', S.recorderFailed(e.message)));
      return;
    }
    chunks = [];
    rec.ondataavailable = (e) => { if (e.data && e.data.size) chunks.push(e.data); };
    rec.onstop = finished;
    rec.start(1000);
    started = Date.now();
    start.hidden = true;
    start.disabled = false;
    stop.hidden = false;
    kind.disabled = true;
    stop.focus();
    say.textContent = S.recordingNow;
    announce(S.recordingNow);
    timer = setInterval(() => {
      const t = Date.now() - started;
      say.textContent = S.recordingTime(fmtClock(t), fmtClock(maxMs));
      if (t >= maxMs) end();
    }, 1000);
  }

  function end() {
    if (rec && rec.state !== 'inactive') rec.stop();
  }

  function finished() {
    const t = Date.now() - started;
    stopStream();
    blob = new Blob(chunks, { type: (rec && rec.mimeType) || 'video/webm' });
    url = URL.createObjectURL(blob);
    const isVideo = blob.type.startsWith('video');
    const player = h(isVideo ? 'video' : 'audio', { class: 'preview', controls: true, src: url, 'aria-label': S.recordingPreview, 'data-testid': 'record-preview' });
    clear(stage, player);
    stop.hidden = true;
    again.hidden = false;
    submit.hidden = false;
    kind.disabled = false;
    const msg = S.recordingStopped(fmtClock(t));
    say.textContent = msg;
    announce(msg);
    submit.focus();
  }

  function reset() {
    if (url) URL.revokeObjectURL(url);
    url = null; blob = null;
    clear(stage);
    again.hidden = true;
    submit.hidden = true;
    start.hidden = false;
    say.textContent = '';
    start.focus();
  }

  start.addEventListener('click', begin);
  stop.addEventListener('click', end);
  again.addEventListener('click', reset);
  submit.addEventListener('click', () => {
    if (!blob) return;
    const ext = blob.type.includes('mp4') ? 'mp4' : blob.type.includes('ogg') ? 'ogg' : 'webm';
    onReady(blob, `recording-${new Date().toISOString().replace(/[:.]/g, '-')}.${ext}`);
  });
  const el = h('div', { class: 'recorder' }, kind, h('div', { class: 'buttons' }, start, stop, again, submit), say, meterWrap, stage);
  el.dispose = () => { end(); stopStream(); };
  return el;
}
