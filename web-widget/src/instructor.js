// Instructor view: queue dashboard (retry, review, release all), review of
// one submission (video, transcript, both evaluations side by side, plugin
// report, override, release, audit log), the rubric editor with the plugin's
// generated configuration form, and who has not submitted.
import S, { languageName } from './i18n.js';
import { h, clear, announce, notice, tabs, table, fmtDate, fmtPoints, fmtBytes, errorText, uid, field, checkField } from './ui.js';
import { mediaPanel, reportOf } from './student.js';
import { schemaForm } from './schemaform.js';
import { calibrationPanel, blindForm, instructorGrade, downloadCsv } from './calibration.js';

const enc = encodeURIComponent;

// Whisper's languages (viva_models::language::WHISPER_LANGUAGES), for the
// assignment's language menu; names come from the browser in the reader's
// language.
const WHISPER_LANGUAGES = 'en zh de es ru ko fr ja pt tr pl ca nl ar sv it id hi fi vi he uk el ms cs ro da hu ta no th ur hr bg lt la mi ml cy sk te fa lv bn sr az sl kn et mk br eu is hy ne mn bs kk sq sw gl mr pa si km sn yo so af oc ka be tg sd gu am yi lo uz fo ht ps tk nn mt sa lb my bo tl mg as tt haw ln ha ba jw su yue'.split(' ');

export function mount(panel, ctx) {
  const { api } = ctx;
  const top = h('div', { class: 'assignment-bar' });
  const body = h('div', { class: 'instructor' });
  panel.append(top, body);
  let assignments = [];
  let current = null;
  let tabset = null;
  let dashStop = null;

  async function load(selectId) {
    try {
      assignments = await api.get('/api/v1/assignments');
    } catch (e) {
      clear(body, notice('error', S.loadFailed(errorText(e))));
      return;
    }
    const id = selectId || ctx.assignmentId || (assignments[0] && assignments[0].id);
    current = assignments.find((a) => a.id === id) || null;
    renderTop();
    renderTabs(current ? 'queue' : 'rubric');
  }

  function renderTop() {
    const sel = h('select', { id: uid('asg'), 'data-testid': 'assignment-select' },
      assignments.map((a) => h('option', { value: a.id, text: a.title, selected: current && a.id === current.id })));
    sel.addEventListener('change', () => { current = assignments.find((a) => a.id === sel.value); renderTabs('queue'); });
    const add = h('button', { type: 'button', text: S.newAssignment, on: { click: () => { current = null; sel.value = ''; renderTabs('rubric'); } } });
    clear(top, assignments.length ? h('div', { class: 'field inline' }, h('label', { for: sel.id, text: S.chooseAssignment }), sel) : h('p', { text: S.noAssignments }), add);
  }

  function renderTabs(initial) {
    if (tabset) tabset.dispose();
    const list = [
      { id: 'rubric', label: S.tabs.rubric, render: (p) => rubricEditor(p) },
    ];
    if (current) {
      list.unshift({ id: 'queue', label: S.tabs.queue, render: (p) => dashboard(p) });
      list.push({ id: 'versions', label: S.tabs.versions, render: (p) => versions(p) });
      list.splice(1, 0, { id: 'calibration', label: S.calib.tab, render: (p) => calibrationPanel(p, api, current) });
      list.push({ id: 'students', label: S.tabs.students, render: (p) => students(p) });
    }
    tabset = tabs(S.views.instructor, list, initial);
    clear(body, tabset);
  }

  // ---- queue dashboard ----
  function dashboard(p) {
    const wrap = h('div', { 'data-testid': 'dashboard' });
    const msg = h('div', { 'aria-live': 'polite' });
    p.append(h('h2', { text: S.queueTitle }), h('p', { class: 'muted', text: S.refreshing }), msg, wrap);
    let timer = null, stopped = false;
    // Grades chosen for "release selected", kept across refreshes.
    const selected = new Set();
    const blindBox = h('input', { type: 'checkbox', 'data-testid': 'blind-first', checked: localStorage.getItem('viva.blindFirst') === '1' });
    blindBox.addEventListener('change', () => localStorage.setItem('viva.blindFirst', blindBox.checked ? '1' : '0'));
    const refresh = async () => {
      if (stopped) return;
      try {
        const d = await api.get(`/api/v1/assignments/${enc(current.id)}/dashboard`);
        if (!stopped) render(d);
      } catch (e) {
        clear(wrap, notice('error', S.loadFailed(errorText(e))));
      }
    };
    function render(d) {
      const awaiting = d.rows.filter((r) => r.state === 'awaiting_review').length;
      const relAll = h('button', {
        type: 'button', class: 'primary', 'data-testid': 'release-all', text: S.releaseAll(awaiting), disabled: awaiting === 0,
        on: { click: async () => {
          try {
            const r = await api.post(`/api/v1/assignments/${enc(current.id)}/release-all`);
            clear(msg, notice('ok', S.releasedN(r.released.length)));
            announce(S.releasedN(r.released.length));
            refresh();
          } catch (e) { clear(msg, notice('error', errorText(e))); }
        } },
      });
      for (const id of [...selected]) {
        if (!d.rows.some((r) => r.submission_id === id && r.state === 'awaiting_review')) selected.delete(id);
      }
      const relSel = h('button', {
        type: 'button', 'data-testid': 'release-selected', text: S.calib.releaseSelected(selected.size), disabled: selected.size === 0,
        on: { click: async () => {
          try {
            const r = await api.post(`/api/v1/assignments/${enc(current.id)}/release-selected`, { submission_ids: [...selected] });
            selected.clear();
            const said = S.calib.releasedSelected(r.released.length, r.skipped.length);
            clear(msg, notice('ok', said));
            announce(said);
            refresh();
          } catch (e) { clear(msg, notice('error', errorText(e))); }
        } },
      });
      const csv = h('button', { type: 'button', 'data-testid': 'grades-csv', text: S.calib.downloadGrades, on: { click: () =>
        downloadCsv(api, `/api/v1/assignments/${enc(current.id)}/grades.csv`, `grades-${current.id}.csv`).catch((e) => clear(msg, notice('error', errorText(e)))) } });
      const rows = d.rows.map((r) => {
        const state = S.states[r.state] || r.state;
        const pick = r.state === 'awaiting_review'
          ? h('input', { type: 'checkbox', 'data-testid': 'select', 'data-submission': r.submission_id, checked: selected.has(r.submission_id), 'aria-label': S.calib.select(r.user_name || r.user_id) })
          : null;
        if (pick) {
          pick.addEventListener('change', () => {
            if (pick.checked) selected.add(r.submission_id); else selected.delete(r.submission_id);
            relSel.textContent = S.calib.releaseSelected(selected.size);
            relSel.disabled = selected.size === 0;
          });
        }
        const where = r.position ? (r.running ? S.running(S.queueName[r.phase] || r.phase) : S.inQueue(S.queueName[r.phase] || r.phase, r.position, r.queue_length)) : '';
        const status = h('div', {}, h('span', { class: `badge s-${r.state}`, text: state }), where ? h('div', { class: 'muted', text: where }) : null,
          r.retrying ? h('div', { class: 'muted', text: S.retrying }) : null,
          r.paused ? h('p', { class: 'reason', 'data-testid': 'paused', text: r.paused }) : null,
          r.failure_reason ? h('p', { class: 'reason', text: r.failure_reason }) : null);
        const eta = r.eta_seconds != null ? (r.eta_seconds < 60 ? S.etaSoon : S.eta(S.duration(r.eta_seconds))) : '';
        const score = r.total != null ? h('div', {}, `${fmtPoints(r.total)} / ${fmtPoints(r.max)}`, r.needs_review ? h('span', { class: 'badge warn', text: S.needsReview }) : null) : '—';
        const actions = h('div', { class: 'buttons' });
        if (['awaiting_review', 'released', 'evaluated'].includes(r.state)) {
          actions.append(h('button', { type: 'button', 'data-testid': 'review', 'data-submission': r.submission_id, text: S.review, 'aria-label': `${S.review}: ${r.user_name || r.user_id}`, on: { click: () => openReview(r) } }));
        }
        if (r.state === 'failed') {
          actions.append(h('button', {
            type: 'button', 'data-testid': 'retry', text: S.retry, 'aria-label': `${S.retry}: ${r.user_name || r.user_id}`,
            on: { click: async () => {
              try { await api.post(`/api/v1/submissions/${enc(r.submission_id)}/retry`); clear(msg, notice('ok', S.retried)); announce(S.retried); refresh(); }
              catch (e) { clear(msg, notice('error', errorText(e))); }
            } },
          }));
        }
        return h('tr', { 'data-submission': r.submission_id, 'data-state': r.state },
          h('td', {}, pick),
          h('th', { scope: 'row', text: r.user_name || r.user_id }), h('td', { text: String(r.attempt) }), h('td', {}, status, eta ? h('div', { class: 'muted', text: eta }) : null), h('td', {}, score), h('td', {}, actions));
      });
      const sys = h('p', {}, S.systemStatus(S.systemPhase[d.system_phase] || d.system_phase),
        d.batch ? ` — ${S.batchProgress(d.batch.stt_done, d.batch.size)}` : '', '. ', S.counts(d.counts, S.states));
      const alerts = (d.unavailable || []).map((u) => notice('warn', S.modelDown(u.role === 'stt' ? S.stt : S.evaluatorRole(u.role), u.error)));
      clear(wrap, ...alerts, sys, h('div', { class: 'buttons' }, relAll, relSel, csv), checkField(S.calib.blindFirst, blindBox),
        d.rows.length ? table(S.queueTitle, [h('span', { class: 'sr-only', text: S.calib.selectColumn }), S.student, S.attempt, S.status, S.score, S.actions], rows) : h('p', { text: S.noSubmissions }));
    }
    function openReview(r) {
      stop();
      clear(p);
      review(p, r, () => { clear(p); dashboard(p); });
    }
    const stop = () => { stopped = true; clearInterval(timer); };
    refresh();
    timer = setInterval(refresh, 3000);
    dashStop = stop;
    return () => { if (dashStop) dashStop(); };
  }

  // ---- review one submission ----
  async function review(p, row, back) {
    const backBtn = h('button', { type: 'button', 'data-testid': 'back', text: S.back, on: { click: back } });
    const who = row.user_name || row.user_id;
    const heading = h('h2', { tabindex: '-1', text: S.reviewTitle(who, row.attempt) });
    const area = h('div', { 'data-testid': 'review-screen' });
    const msg = h('div', { 'aria-live': 'polite', 'data-testid': 'review-message' });
    p.append(backBtn, heading, msg, area);
    heading.focus();
    let media = null;
    // Grade blind first: the evaluations stay hidden until the instructor
    // has set their own levels (or chose to skip).
    let revealed = localStorage.getItem('viva.blindFirst') !== '1';
    async function render() {
      let sub, audit, passback, mine;
      try {
        [sub, audit, passback, mine] = await Promise.all([
          api.get(`/api/v1/submissions/${enc(row.submission_id)}`),
          api.get(`/api/v1/submissions/${enc(row.submission_id)}/audit`),
          api.get(`/api/v1/submissions/${enc(row.submission_id)}/passback`).catch(() => []),
          api.get(`/api/v1/submissions/${enc(row.submission_id)}/instructor-grade`).catch(() => ({ levels: [], exemplar: false })),
        ]);
      } catch (e) { clear(area, notice('error', S.loadFailed(errorText(e)))); return; }
      if (!revealed && !(mine.levels || []).length && ['awaiting_review', 'released'].includes(sub.state)) {
        if (media && media.dispose) media.dispose();
        media = mediaPanel(api, sub);
        clear(area, media, blindForm(api, current, sub, () => { revealed = true; render(); }));
        return;
      }
      revealed = true;
      const a = current;
      const score = sub.score || {};
      const reasons = score.reasons || reportOf(score).review_reasons || [];
      const parts = [];
      if (score.needs_review && reasons.length) {
        parts.push(h('div', { class: 'notice warn', 'data-testid': 'review-reasons' }, h('h3', { text: S.reviewReasons }),
          h('ul', {}, reasons.map((x) => h('li', { text: x })))));
      }
      if (media && media.dispose) media.dispose();
      media = mediaPanel(api, sub, { staff: true, language: a.language });
      parts.push(media, evaluations(a, sub), instructorGrade(api, a, sub, mine, render), pluginReport(score), overrideForm(a, sub), auditList(audit, passback));
      clear(area, ...parts);
    }
    function evaluations(a, sub) {
      const evs = sub.evaluations || [];
      if (!evs.length) return h('section', {}, h('h3', { text: S.evaluations }), h('p', { text: S.noEvaluations }));
      const score = reportOf(sub.score);
      const plug = Object.fromEntries((score.criteria || []).map((c) => [c.criterion_id, c]));
      const rows = a.rubric.criteria.map((c) => {
        const ratings = evs.map((e) => (e.ratings || []).find((r) => r.criterion_id === c.id));
        const ranks = ratings.map((r) => (r ? c.levels.findIndex((l) => l.label === r.level) : -1)).filter((x) => x >= 0);
        const disagree = ranks.length > 1 && Math.max(...ranks) !== Math.min(...ranks);
        const gap = disagree ? Math.max(...ranks) - Math.min(...ranks) : 0;
        return h('tr', { class: disagree ? 'disagree' : '', 'data-criterion': c.id, 'data-disagree': disagree ? String(gap) : null },
          h('th', { scope: 'row' }, c.title, disagree ? h('span', { class: 'badge warn', text: S.disagree }) : null),
          ratings.map((r) => h('td', {}, r ? [h('strong', { text: r.level }), h('p', {}, h('em', { text: S.evidence + ': ' }), r.evidence), h('p', {}, h('em', { text: S.rationale + ': ' }), r.rationale)] : '—')),
          h('td', {}, plug[c.id] ? `${plug[c.id].level || '—'}, ${fmtPoints(plug[c.id].points)}` : '—'));
      });
      const plugName = (score.plugin && score.plugin.name) || current.plugin;
      return h('section', { 'data-testid': 'evaluations' }, h('h3', { text: S.evaluations }),
        table(S.evaluations, [S.criterion, ...evs.map((e) => S.evaluator(e.role, e.model)), S.pluginColumn(plugName)], rows, { class: 'side-by-side' }));
    }
    function pluginReport(stored) {
      const score = reportOf(stored);
      if (!score.plugin) return null;
      const u = score.usage || {};
      return h('section', { 'data-testid': 'plugin-report' }, h('h3', { text: S.pluginReport }),
        h('p', {}, `${score.plugin.name} ${score.plugin.version} — `, h('strong', { text: S.totalOf(fmtPoints(stored.total), fmtPoints(stored.max)) })),
        score.feedback ? h('p', { class: 'pre', text: score.feedback }) : null,
        u.elapsed_us != null ? h('p', { class: 'muted', text: S.pluginUsage((u.elapsed_us / 1000).toFixed(1), fmtBytes(u.peak_memory_bytes || 0)) }) : null,
        score.plugin.sha256 ? h('p', { class: 'muted', 'data-testid': 'plugin-sha256', title: score.plugin.sha256, text: S.pluginSha(score.plugin.sha256.slice(0, 12)) }) : null);
    }
    function overrideForm(a, sub) {
      const score = reportOf(sub.score);
      const locked = sub.state !== 'awaiting_review';
      const by = Object.fromEntries((score.criteria || []).map((c) => [c.criterion_id, c]));
      const inputs = a.rubric.criteria.map((c) => {
        const max = Math.max(...c.levels.map((l) => l.points));
        const pts = h('input', { type: 'number', min: '0', max: String(max), step: 'any', value: String((by[c.id] && by[c.id].points) ?? 0), 'data-criterion': c.id, 'data-testid': `points-${c.id}`, disabled: locked });
        const fb = h('textarea', { rows: '2', 'data-criterion': c.id, 'data-testid': `feedback-${c.id}`, value: (by[c.id] && by[c.id].feedback) || '', disabled: locked });
        return { c, pts, fb, el: h('fieldset', {}, h('legend', { text: c.title }), field(S.pointsFor(c.title, fmtPoints(max), fmtPoints(c.weight)), pts), field(S.feedbackFor(c.title), fb)) };
      });
      const overall = h('textarea', { rows: '3', 'data-testid': 'overall-feedback', value: score.feedback || '', disabled: locked });
      const note = h('input', { type: 'text', 'data-testid': 'override-note', disabled: locked });
      const shareNote = h('input', { type: 'checkbox', 'data-testid': 'share-note', disabled: locked });
      const saveBtn = h('button', { type: 'submit', class: 'primary', 'data-testid': 'save-override', text: S.saveOverride, disabled: locked });
      const relBtn = h('button', { type: 'button', class: 'primary', 'data-testid': 'release', text: S.release, disabled: locked });
      const form = h('form', { 'data-testid': 'override-form', novalidate: true }, inputs.map((x) => x.el), field(S.overallFeedbackLabel, overall), field(S.note, note),
        checkField(S.shareNote, shareNote), h('div', { class: 'buttons' }, saveBtn, relBtn));
      form.addEventListener('submit', async (e) => {
        e.preventDefault();
        const body = {
          criteria: inputs.map(({ c, pts, fb }) => ({ criterion_id: c.id, points: Number(pts.value), feedback: fb.value })),
          feedback: overall.value,
          note: note.value || null,
          share_note: shareNote.checked,
        };
        try {
          const r = await api.post(`/api/v1/submissions/${enc(sub.id)}/override`, body);
          clear(msg, notice('ok', S.overrideSaved(r.changes.length)));
          announce(S.overrideSaved(r.changes.length));
          render();
        } catch (err) { clear(msg, notice('error', errorText(err))); announce(errorText(err), true); }
      });
      relBtn.addEventListener('click', async () => {
        try {
          await api.post(`/api/v1/submissions/${enc(sub.id)}/release`);
          clear(msg, notice('ok', S.releasedOne));
          announce(S.releasedOne);
          render();
        } catch (err) { clear(msg, notice('error', errorText(err))); }
      });
      return h('section', { 'data-testid': 'override' }, h('h3', { text: S.override }),
        h('p', { class: 'help', text: locked ? S.overrideLocked(S.states[sub.state] || sub.state) : S.overrideHelp }), form);
    }
    function auditList(entries, passback) {
      const describe = (e) => {
        const d = e.details || {};
        const changes = (d.changes || []).map(S.change).join('; ');
        return `${e.action}${changes ? ': ' + changes : ''}${d.note ? ` (${d.note})` : ''}`;
      };
      return h('section', { 'data-testid': 'audit' }, h('h3', { text: S.audit }),
        entries.length ? h('ul', { class: 'audit' }, entries.map((e) => h('li', { 'data-action': e.action, text: S.auditLine(fmtDate(e.at), e.actor, describe(e)) }))) : h('p', { text: S.auditEmpty }),
        passback.length ? h('div', {}, h('h4', { text: S.passback }), h('ul', {}, passback.map((r) => h('li', { text: S.passbackRow(r) })))) : null);
    }
    render();
  }

  // ---- rubric and plugin versions, rescoring ----
  function versions(p) {
    const wrap = h('div', { 'data-testid': 'versions' });
    const msg = h('div', { 'aria-live': 'polite', 'data-testid': 'rescore-message' });
    p.append(h('h2', { text: S.versionsTitle }), h('p', { class: 'help', text: S.versionsHelp }), msg, wrap);
    let timer = null, stopped = false;
    const base = `/api/v1/assignments/${enc(current.id)}`;
    const refresh = async () => {
      if (stopped) return;
      let v, r;
      try {
        [v, r] = await Promise.all([api.get(`${base}/versions`), api.get(`${base}/rescores`)]);
      } catch (e) {
        clear(wrap, notice('error', S.loadFailed(errorText(e))));
        return;
      }
      if (stopped) return;
      render(v, r);
      // Poll while a rescore runs.
      if (r.some((x) => !x.finished_at && x.done < x.total)) timer = setTimeout(refresh, 1500);
    };
    async function start() {
      try {
        const r = await api.post(`${base}/rescore`, {});
        msg.textContent = S.rescoreStarted(r.total);
        announce(S.rescoreStarted(r.total));
      } catch (e) {
        clear(msg, notice('error', errorText(e)));
      }
      clearTimeout(timer);
      refresh();
    }
    function render(v, rescores) {
      const running = rescores.some((x) => !x.finished_at && x.done < x.total);
      const status = h('div', { class: 'field' },
        h('p', { 'data-testid': 'version-status', text: `${S.versionCurrent(v.current)} ${v.needs_rescore ? S.needsRescore(v.needs_rescore) : S.upToDate}` }),
        v.needs_rescore && !running ? h('button', { type: 'button', 'data-testid': 'rescore', text: S.rescoreButton, on: { click: start } }) : null,
        running ? h('p', { class: 'muted', text: S.rescoreRunning }) : null);
      const list = rescores.length ? h('section', { 'data-testid': 'rescores' }, h('h3', { text: S.rescoresTitle }),
        h('ul', { class: 'rescores' }, rescores.map((x) => h('li', { 'data-rescore': x.id },
          h('label', { for: `p-${x.id}`, text: S.rescoreLine(x.version, x.done, x.total) }), ' ',
          h('progress', { id: `p-${x.id}`, max: String(Math.max(1, x.total)), value: String(x.total ? x.done : 1) }),
          h('p', { class: 'muted', text: [S.rescoreSplit(x.scoring_only, x.reevaluate), x.failed ? S.rescoreFailed(x.failed) : null, S.rescoreBy(x.created_by, fmtDate(x.created_at))].filter(Boolean).join(' · ') }),
          x.total && x.done >= x.total && x.done > x.failed ? h('p', { text: S.rescoreRelease }) : null)))) : null;
      const rows = v.versions.map((x) => [
        `${x.version}${x.current ? S.currentMark : ''}`,
        fmtDate(x.created_at),
        x.created_by,
        `${S.versionChange[x.change] || x.change}${x.change === 'created' ? '' : `: ${x.summary}`}`,
        h('span', { title: x.plugin_sha256 || '' }, x.plugin_sha256 ? `${x.plugin} ${x.plugin_sha256.slice(0, 12)}` : x.plugin),
        String(x.submissions),
      ]);
      clear(wrap, status, list, table(S.versionCaption, S.versionCols, rows, { 'data-testid': 'version-table' }));
    }
    refresh();
    return () => { stopped = true; clearTimeout(timer); };
  }

  // ---- rubric editor and plugin configuration ----
  function rubricEditor(p) {
    const a = current || {
      title: '', prompt: '', release_policy: 'manual', plugin: 'weighted-criteria', plugin_config: {},
      rubric: { criteria: [{ id: 'content', title: 'Content', description: '', weight: 1, levels: [{ label: 'weak', points: 0, descriptor: '' }, { label: 'strong', points: 4, descriptor: '' }] }] },
    };
    const model = JSON.parse(JSON.stringify(a.rubric));
    const msg = h('div', { 'aria-live': 'polite', 'data-testid': 'rubric-message' });
    const title = h('input', { type: 'text', value: a.title, required: true, 'data-testid': 'assignment-title' });
    const promptEl = h('textarea', { rows: '3', value: a.prompt, required: true, 'data-testid': 'assignment-prompt' });
    const policy = h('select', { 'data-testid': 'release-policy' }, Object.entries(S.policies).map(([k, v]) => h('option', { value: k, text: v, selected: k === a.release_policy })));
    const attempts = h('input', { type: 'number', min: '1', step: '1', inputmode: 'numeric', 'data-testid': 'max-attempts', value: a.max_attempts == null ? '' : String(a.max_attempts) });
    const languages = WHISPER_LANGUAGES.map((c) => [c, languageName(c)]).sort((x, y) => x[1].localeCompare(y[1]));
    const language = h('select', { 'data-testid': 'assignment-language' },
      h('option', { value: '', text: S.languageAuto, selected: !a.language }),
      languages.map(([c, n]) => h('option', { value: c, text: `${n} (${c})`, selected: c === a.language })));
    const vocabulary = h('textarea', { rows: '2', maxlength: '600', value: a.vocabulary || '', 'data-testid': 'assignment-vocabulary' });
    const crit = h('div', { class: 'criteria', 'data-testid': 'criteria-editor' });
    const maxLine = h('p', { class: 'muted', 'aria-live': 'polite' });
    const maxTotal = () => model.criteria.reduce((t, c) => t + (Number(c.weight) || 0) * Math.max(0, ...c.levels.map((l) => Number(l.points) || 0)), 0);
    const upd = () => { maxLine.textContent = S.maxTotal(fmtPoints(maxTotal())); };
    const inp = (obj, key, attrs = {}, num = false) => {
      const el = h(attrs.rows ? 'textarea' : 'input', { type: attrs.rows ? null : num ? 'number' : 'text', step: num ? 'any' : null, ...attrs, value: obj[key] == null ? '' : String(obj[key]) });
      el.addEventListener('input', () => { obj[key] = num ? Number(el.value) : el.value; upd(); });
      return el;
    };
    function renderCriteria(focusSel) {
      clear(crit, model.criteria.map((c, i) => {
        const levels = h('div', { class: 'table-wrap' }, h('table', { class: 'levels' },
          h('caption', { text: `${S.levels}: ${c.title || c.id}` }),
          h('thead', {}, h('tr', {}, [S.levelLabel, S.levelPoints, S.levelDescriptor, S.actions].map((x) => h('th', { scope: 'col', text: x })))),
          h('tbody', {}, c.levels.map((l, j) => h('tr', {},
            h('td', {}, inp(l, 'label', { 'aria-label': `${S.levelN(j + 1)} ${S.levelLabel}`, 'data-testid': `level-${i}-${j}-label` })),
            h('td', {}, inp(l, 'points', { 'aria-label': `${S.levelN(j + 1)} ${S.levelPoints}`, min: '0', 'data-testid': `level-${i}-${j}-points` }, true)),
            h('td', {}, inp(l, 'descriptor', { 'aria-label': `${S.levelN(j + 1)} ${S.levelDescriptor}` })),
            h('td', {}, h('button', { type: 'button', text: S.removeLevel, 'aria-label': `${S.removeLevel} ${j + 1}: ${c.title}`, disabled: c.levels.length <= 2, on: { click: () => { c.levels.splice(j, 1); renderCriteria(); upd(); } } })))))));
        return h('fieldset', { class: 'criterion', 'data-criterion': i },
          h('legend', { text: S.criterionN(i + 1, c.title) }),
          field(S.criterionId, inp(c, 'id', { 'data-testid': `criterion-${i}-id` })),
          field(S.criterionTitle, inp(c, 'title', { 'data-testid': `criterion-${i}-title` })),
          field(S.description, inp(c, 'description', { rows: '2' })),
          field(S.weight, inp(c, 'weight', { min: '0', 'data-testid': `criterion-${i}-weight` }, true)),
          levels,
          h('div', { class: 'buttons' },
            h('button', { type: 'button', 'data-testid': `add-level-${i}`, text: S.addLevel, 'aria-label': `${S.addLevel}: ${c.title}`, on: { click: () => { c.levels.push({ label: '', points: 0, descriptor: '' }); renderCriteria(`[data-testid="level-${i}-${c.levels.length - 1}-label"]`); } } }),
            h('button', { type: 'button', class: 'danger', text: S.removeCriterion, 'aria-label': `${S.removeCriterion}: ${c.title}`, disabled: model.criteria.length <= 1, on: { click: () => { model.criteria.splice(i, 1); renderCriteria(); upd(); } } })));
      }));
      upd();
      if (focusSel) { const f = crit.querySelector(focusSel); if (f) f.focus(); }
    }
    renderCriteria();
    const addCrit = h('button', { type: 'button', 'data-testid': 'add-criterion', text: S.addCriterion, on: { click: () => {
      model.criteria.push({ id: `criterion-${model.criteria.length + 1}`, title: '', description: '', weight: 1, levels: [{ label: 'weak', points: 0, descriptor: '' }, { label: 'strong', points: 4, descriptor: '' }] });
      renderCriteria(`[data-testid="criterion-${model.criteria.length - 1}-title"]`);
    } } });
    // Import / export
    const importInput = h('input', { type: 'file', accept: '.json,application/json', 'data-testid': 'import-rubric' });
    importInput.addEventListener('change', async () => {
      const f = importInput.files[0];
      if (!f) return;
      try {
        const j = JSON.parse(await f.text());
        const r = j.rubric || j;
        if (!Array.isArray(r.criteria) || !r.criteria.length) throw new Error('no "criteria" list');
        model.criteria = r.criteria.map((c) => ({ id: c.id, title: c.title, description: c.description || '', weight: c.weight ?? 1, levels: (c.levels || []).map((l) => ({ label: l.label, points: l.points, descriptor: l.descriptor || '' })) }));
        renderCriteria();
        clear(msg, notice('ok', S.imported));
        announce(S.imported);
      } catch (e) { clear(msg, notice('error', S.importFailed(errorText(e)))); }
    });
    const exportBtn = h('button', { type: 'button', 'data-testid': 'export-rubric', text: S.exportRubric, on: { click: () => {
      const url = URL.createObjectURL(new Blob([JSON.stringify({ criteria: model.criteria }, null, 2)], { type: 'application/json' }));
      const link = h('a', { href: url, download: `${(title.value || 'rubric').replace(/[^\w-]+/g, '-')}.rubric.json` });
      document.body.append(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(url), 10000);
    } } });
    // Plugin choice and its generated form
    const pluginSel = h('select', { 'data-testid': 'plugin-select' });
    const cfgHolder = h('div', {});
    const cfgMsg = h('div', { 'aria-live': 'polite', 'data-testid': 'config-message' });
    let plugins = [], form = null, validateTimer = null;
    const pluginOf = (name) => plugins.find((x) => x.name === name && x.enabled) || plugins.find((x) => x.name === name);
    function showPluginForm(name, value) {
      const pl = pluginOf(name);
      form = schemaForm(pl ? pl.config_schema : {}, value || (pl && pl.default_config) || {});
      const reset = h('button', { type: 'button', text: S.pluginDefaults, on: { click: () => showPluginForm(name, pl && pl.default_config) } });
      form.addEventListener('input', () => { clearTimeout(validateTimer); validateTimer = setTimeout(validate, 400); });
      form.addEventListener('change', () => { clearTimeout(validateTimer); validateTimer = setTimeout(validate, 100); });
      clear(cfgHolder, pl && pl.description ? h('p', { class: 'help', text: pl.description }) : null, form, reset);
    }
    async function validate() {
      const pl = pluginOf(pluginSel.value);
      if (!pl || !form) return true;
      const local = form.problems();
      if (local.length) { clear(cfgMsg, notice('error', S.configInvalid(local.join('; ')))); return false; }
      try {
        await api.post(`/api/v1/plugins/${enc(pl.id)}/validate-config`, form.value());
        clear(cfgMsg, notice('ok', S.configValid));
        return true;
      } catch (e) { clear(cfgMsg, notice('error', S.configInvalid(errorText(e)))); return false; }
    }
    api.get('/api/v1/plugins').then((list) => {
      plugins = list;
      const names = [...new Set(list.filter((x) => x.enabled).map((x) => x.name))];
      if (!names.includes(a.plugin)) names.push(a.plugin);
      clear(pluginSel, names.map((n) => { const pl = pluginOf(n); return h('option', { value: n, text: pl ? `${n} ${pl.version}` : n, selected: n === a.plugin }); }));
      showPluginForm(a.plugin, a.plugin_config && Object.keys(a.plugin_config).length ? a.plugin_config : null);
    }).catch((e) => clear(cfgHolder, notice('error', S.loadFailed(errorText(e)))));
    pluginSel.addEventListener('change', () => { showPluginForm(pluginSel.value, null); cfgMsg.replaceChildren(); });
    const save = h('button', { type: 'submit', class: 'primary', 'data-testid': 'save-assignment', text: S.saveAssignment });
    const formEl = h('form', { class: 'rubric-form', novalidate: true },
      h('h2', { text: S.rubricTitle }), msg,
      field(S.title, title), field(S.prompt, promptEl), field(S.releasePolicy, policy), field(S.maxAttempts, attempts, S.maxAttemptsHelp),
      field(S.language, language, S.languageHelp), field(S.vocabulary, vocabulary, S.vocabularyHelp),
      h('fieldset', { class: 'criteria-set' }, h('legend', { text: S.criteria }), crit, maxLine, h('div', { class: 'buttons' }, addCrit, exportBtn),
        field(S.importRubric, importInput)),
      h('fieldset', { class: 'plugin-set' }, h('legend', { text: S.plugin }), field(S.plugin, pluginSel), h('h3', { text: S.pluginConfig }), cfgHolder, cfgMsg),
      h('div', { class: 'buttons' }, save));
    formEl.addEventListener('submit', async (e) => {
      e.preventDefault();
      if (!(await validate())) { announce(cfgMsg.textContent, true); return; }
      const body = {
        title: title.value, prompt: promptEl.value, release_policy: policy.value,
        max_attempts: attempts.value.trim() === '' ? null : Number(attempts.value),
        language: language.value || null, vocabulary: vocabulary.value.trim() || null,
        rubric: { criteria: model.criteria.map((c) => ({ ...c, weight: Number(c.weight), levels: c.levels.map((l) => ({ ...l, points: Number(l.points) })) })) },
        plugin: pluginSel.value, plugin_config: form ? form.value() : {},
      };
      try {
        const saved = current
          ? await api.put(`/api/v1/assignments/${enc(current.id)}`, body)
          : await api.post('/api/v1/assignments', body);
        const created = !current;
        clear(msg, notice('ok', created ? S.assignmentCreated : S.assignmentSaved));
        announce(created ? S.assignmentCreated : S.assignmentSaved);
        current = saved;
        const i = assignments.findIndex((x) => x.id === saved.id);
        if (i >= 0) assignments[i] = saved; else assignments.push(saved);
        if (created) { renderTop(); renderTabs('rubric'); }
      } catch (err) {
        clear(msg, notice('error', errorText(err)));
        announce(errorText(err), true);
      }
    });
    p.append(formEl);
  }

  // ---- who has not submitted ----
  async function students(p) {
    const out = h('div', { 'data-testid': 'not-submitted' });
    p.append(h('h2', { text: S.studentsTitle }), out);
    let list, source;
    try {
      if (ctx.data.link) {
        list = await api.get(`/api/v1/lti/members?link=${enc(ctx.data.link)}`);
        source = S.rosterFromPlatform;
      }
    } catch (_) { list = null; }
    try {
      if (!list) { list = await api.get(`/api/v1/assignments/${enc(current.id)}/roster`); source = S.rosterFromViva; }
    } catch (e) { clear(out, notice('error', S.loadFailed(errorText(e)))); return; }
    const learners = list.filter((m) => m.learner);
    const missing = learners.filter((m) => !m.submitted);
    clear(out, h('p', { class: 'muted', text: source }), h('p', { text: S.submittedCount(learners.length - missing.length, learners.length) }),
      missing.length ? h('ul', {}, missing.map((m) => h('li', { text: m.name || m.user_id }))) : h('p', { text: S.allSubmitted }));
  }

  load();
  return () => { if (tabset) tabset.dispose(); };
}
