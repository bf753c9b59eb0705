// Calibration in the instructor view: the agreement of the evaluators and
// the combined grade with the instructor's own grading (per criterion, with
// a plain-words verdict, the release gate and CSV export), grading blind
// before seeing the evaluations, marking exemplars, and CSV downloads.
import S from './i18n.js';
import { h, clear, announce, notice, table, field, errorText } from './ui.js';

const enc = encodeURIComponent;
const C = S.calib;

// Fetches a CSV with the session and saves it as a file.
export async function downloadCsv(api, path, name) {
  const text = await api.get(path);
  const url = URL.createObjectURL(new Blob([text], { type: 'text/csv' }));
  const link = h('a', { href: url, download: name });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

const pct = (x) => `${Math.round(x * 100)} %`;
// Rounds away a negative zero ("-0.00").
const num = (x) => (x == null ? '—' : (Math.abs(x) < 0.005 ? 0 : x).toFixed(2));

function agreementCells(g) {
  const ci = g.qwk_ci95 ? ` [${num(g.qwk_ci95[0])}, ${num(g.qwk_ci95[1])}]` : '';
  return [
    String(g.n), pct(g.exact), pct(g.adjacent),
    g.qwk == null ? C.undefinedQwk : `${num(g.qwk)}${ci}`,
    (g.mean_difference > 0.005 ? '+' : '') + num(g.mean_difference),
  ];
}

// The calibration tab of an assignment.
export function calibrationPanel(p, api, assignment) {
  const msg = h('div', { 'aria-live': 'polite', 'data-testid': 'calibration-message' });
  const out = h('div', { 'data-testid': 'calibration' });
  p.append(h('h2', { text: C.title }), h('p', { class: 'help', text: C.help }), msg, out);
  const base = `/api/v1/assignments/${enc(assignment.id)}/calibration`;
  async function load() {
    let r;
    try { r = await api.get(base); } catch (e) { clear(out, notice('error', S.loadFailed(errorText(e)))); return; }
    const graderName = (g) => (g === 'combined' ? C.combined : S.evaluatorRole(g));
    const rows = [];
    const add = (label, list, verdict, key) => {
      list.forEach((g, i) => rows.push(h('tr', { 'data-criterion': key, 'data-grader': g.grader },
        i === 0 ? h('th', { scope: 'row', rowspan: String(list.length) }, label, verdict ? h('p', { class: 'muted', 'data-testid': `verdict-${key}`, text: verdict }) : null) : null,
        h('td', { text: graderName(g.grader) }),
        agreementCells(g).map((c) => h('td', { text: c })))));
    };
    r.criteria.forEach((c) => add(c.title, c.graders, c.verdict, c.criterion_id));
    add(C.overall, r.overall, null, 'overall');
    const verdict = h('div', { class: `notice ${r.trusted ? 'ok' : 'warn'}`, 'data-testid': 'calibration-verdict' },
      h('strong', { text: r.verdict }), h('p', { text: C.sample(r.graded, r.blind, r.exemplars.length) }));
    const gateState = r.gate
      ? h('p', { 'data-testid': 'gate-state', text: r.gate_met ? C.gateMet(r.gate.min_qwk, r.gate.min_sample) : C.gateUnmet(r.gate.min_qwk, r.gate.min_sample) })
      : h('p', { 'data-testid': 'gate-state', text: C.noGate });
    const minQwk = h('input', { type: 'number', step: '0.05', min: '-1', max: '1', value: r.gate ? String(r.gate.min_qwk) : '0.7', 'data-testid': 'gate-qwk' });
    const minN = h('input', { type: 'number', step: '1', min: '1', value: r.gate ? String(r.gate.min_sample) : '10', 'data-testid': 'gate-sample' });
    const gateForm = h('form', { class: 'gate', novalidate: true, 'data-testid': 'gate-form' },
      field(C.minQwk, minQwk), field(C.minSample, minN),
      h('div', { class: 'buttons' },
        h('button', { type: 'submit', class: 'primary', text: C.saveGate }),
        r.gate ? h('button', { type: 'button', text: C.removeGate, on: { click: async () => {
          try { await api.del(`${base}/gate`); clear(msg, notice('ok', C.gateRemoved)); announce(C.gateRemoved); load(); }
          catch (e) { clear(msg, notice('error', errorText(e))); }
        } } }) : null));
    gateForm.addEventListener('submit', async (e) => {
      e.preventDefault();
      try {
        await api.put(`${base}/gate`, { min_qwk: Number(minQwk.value), min_sample: Number(minN.value) });
        clear(msg, notice('ok', C.gateSaved)); announce(C.gateSaved); load();
      } catch (err) { clear(msg, notice('error', errorText(err))); }
    });
    const csv = h('button', { type: 'button', 'data-testid': 'calibration-csv', text: C.downloadCsv, on: { click: () =>
      downloadCsv(api, `${base}.csv`, `calibration-${assignment.id}.csv`).catch((e) => clear(msg, notice('error', errorText(e)))) } });
    clear(out, verdict,
      rows.length ? table(C.tableCaption, [S.criterion, C.grader, C.n, C.exact, C.adjacent, C.qwk, C.meanDiff], rows, { class: 'calibration' }) : h('p', { text: C.nothingYet }),
      h('div', { class: 'buttons' }, csv),
      h('h3', { text: C.gateTitle }), h('p', { class: 'help', text: C.gateHelp }), gateState, gateForm,
      h('details', {}, h('summary', { text: C.method }), h('p', { class: 'muted', text: r.method })));
  }
  load();
}

// "Grade blind first": the instructor's levels before the evaluations are
// shown. `done()` reveals them.
export function blindForm(api, assignment, sub, done) {
  const msg = h('div', { 'aria-live': 'polite' });
  const selects = assignment.rubric.criteria.map((c) => {
    const sel = h('select', { 'data-testid': `blind-${c.id}`, required: true },
      h('option', { value: '', text: C.chooseLevel }),
      c.levels.map((l) => h('option', { value: l.label, text: `${l.label} (${l.points})${l.descriptor ? ' — ' + l.descriptor : ''}` })));
    return { c, sel };
  });
  const form = h('form', { 'data-testid': 'blind-form', novalidate: true },
    selects.map(({ c, sel }) => field(c.title, sel)),
    h('div', { class: 'buttons' },
      h('button', { type: 'submit', class: 'primary', 'data-testid': 'blind-submit', text: C.blindSubmit }),
      h('button', { type: 'button', 'data-testid': 'blind-skip', text: C.blindSkip, on: { click: () => done(false) } })));
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    const missing = selects.filter(({ sel }) => !sel.value).map(({ c }) => c.title);
    if (missing.length) { clear(msg, notice('error', C.blindMissing(missing.join(', ')))); return; }
    try {
      await api.post(`/api/v1/submissions/${enc(sub.id)}/blind-grade`, { levels: Object.fromEntries(selects.map(({ c, sel }) => [c.id, sel.value])) });
      announce(C.blindSaved);
      done(true);
    } catch (err) { clear(msg, notice('error', errorText(err))); }
  });
  return h('section', { 'data-testid': 'blind-grade' }, h('h3', { text: C.blindTitle }), h('p', { class: 'help', text: C.blindHelp }), msg, form);
}

// The instructor's own levels for a submission and the exemplar switch.
export function instructorGrade(api, assignment, sub, grade, changed) {
  const title = (id) => ((assignment.rubric.criteria.find((c) => c.id === id) || {}).title || id);
  const msg = h('div', { 'aria-live': 'polite' });
  const levels = grade.levels || [];
  const toggle = h('button', {
    type: 'button', 'data-testid': 'exemplar-toggle', 'aria-pressed': grade.exemplar ? 'true' : 'false',
    text: grade.exemplar ? C.unmarkExemplar : C.markExemplar,
    on: { click: async () => {
      try {
        const path = `/api/v1/submissions/${enc(sub.id)}/exemplar`;
        if (grade.exemplar) await api.del(path); else await api.put(path);
        announce(grade.exemplar ? C.exemplarRemoved : C.exemplarMarked);
        changed();
      } catch (e) { clear(msg, notice('error', errorText(e))); }
    } },
  });
  return h('section', { 'data-testid': 'instructor-grade' }, h('h3', { text: C.yourGrade }),
    levels.length
      ? h('ul', {}, levels.map((l) => h('li', { text: C.yourLevel(title(l.criterion_id), l.level || String(l.points), l.source) })))
      : h('p', { class: 'muted', text: C.notGradedYet }),
    grade.exemplar ? h('p', { 'data-testid': 'exemplar-state', text: C.isExemplar }) : null,
    msg, h('div', { class: 'buttons' }, toggle), h('p', { class: 'help', text: C.exemplarHelp }));
}
