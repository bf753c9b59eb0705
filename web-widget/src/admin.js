// Administrator view: health, models and workers (which model in which
// role, loaded or not, memory, phase history), LTI registrations with the
// dynamic registration instructions, rubric plugins (upload, validate,
// enable/disable, recent failures), the installation checks of `viva
// doctor` and the audit log.
import S from './i18n.js';
import { h, clear, announce, notice, tabs, table, fmtBytes, fmtDate, errorText, field } from './ui.js';

const enc = encodeURIComponent;

export function mount(panel, ctx) {
  const { api } = ctx;
  const t = tabs(S.views.admin, [
    { id: 'health', label: S.adminTabs.health, render: (p) => poller(p, health) },
    { id: 'models', label: S.adminTabs.models, render: (p) => poller(p, models) },
    { id: 'platforms', label: S.adminTabs.platforms, render: (p) => platforms(p) },
    { id: 'plugins', label: S.adminTabs.plugins, render: (p) => pluginsView(p) },
    { id: 'doctor', label: S.adminTabs.doctor, render: (p) => doctorView(p) },
    { id: 'audit', label: S.adminTabs.audit, render: (p) => audit(p) },
  ]);
  panel.append(t);

  // Renders fn(system) now and every 5 s while the tab is open.
  function poller(p, fn) {
    const out = h('div', {});
    p.append(out);
    let stop = false;
    const tick = async () => {
      try {
        const sys = await api.get('/api/v1/admin/system');
        if (!stop) clear(out, ...fn(sys));
      } catch (e) { if (!stop) clear(out, notice('error', S.loadFailed(errorText(e)))); }
    };
    tick();
    const timer = setInterval(tick, 5000);
    return () => { stop = true; clearInterval(timer); };
  }

  function health(sys) {
    return [
      h('h2', { text: S.adminTabs.health }),
      h('p', { 'data-testid': 'health' }, h('span', { class: `badge ${sys.ready ? 'ok' : 'warn'}`, text: sys.ready ? S.ready : S.notReady })),
      ...(sys.unavailable || []).map((u) => h('div', { class: 'notice warn', 'data-testid': 'unavailable' },
        h('p', { text: S.unavailableAlert(u.role === 'stt' ? S.stt : S.evaluatorRole(u.role), u.failures, u.error) }),
        h('button', { type: 'button', 'data-testid': 'retry-worker', text: S.tryAgain, 'aria-label': `${S.tryAgain}: ${u.role}`, on: { click: async (e) => {
          e.target.disabled = true;
          try { await api.post(`/api/v1/admin/workers/${enc(u.role)}/retry`); e.target.textContent = S.tryingAgain; } catch (err) { e.target.disabled = false; e.target.textContent = errorText(err); }
        } } }))),
      sys.problems.length ? h('div', { class: 'notice warn' }, h('h3', { text: S.problems }), h('ul', {}, sys.problems.map((x) => h('li', { text: x })))) : null,
      h('dl', { class: 'facts' },
        h('dt', { text: S.version }), h('dd', { text: sys.version }),
        h('dt', { text: S.policy }), h('dd', { text: sys.policy }),
        h('dt', { text: S.phaseNow }), h('dd', { text: S.systemPhase[sys.phase] || sys.phase }),
        h('dt', { text: S.freeSpace }), h('dd', { text: sys.free_bytes == null ? S.unknown : fmtBytes(sys.free_bytes) })),
      h('p', { text: S.queues(sys.queues) }),
    ];
  }

  function models(sys) {
    const proc = (p) => (p ? S.processInfo({ ...p, rss: p.rss_bytes ? fmtBytes(p.rss_bytes) : '?', peak: p.peak_rss_bytes ? fmtBytes(p.peak_rss_bytes) : '?' }) : S.notRunning);
    const rows = sys.models.map((m) => [
      m.kind === 'stt' ? S.stt : S.evaluatorRole(m.role), m.model, m.remote ? S.remoteModel(m.remote.model) : m.model_file, m.remote ? S.remoteMemory : S.memoryFigure(m.memory_mb, m.measured_mb),
      h('span', { class: `badge ${m.loaded ? 'ok' : ''}`, text: m.loaded ? S.yes : S.no }), proc(m.process),
    ]);
    // Remote workers: their server's health and latency (as last reported).
    const remote = sys.models.filter((m) => m.remote).map((m) => {
      const r = m.remote;
      const health = r.requests === 0 ? S.remoteNoRequest : (r.ok ? S.remoteOk : S.remoteFailing(r.last_error));
      return [m.kind === 'stt' ? S.stt : S.evaluatorRole(m.role), r.url,
        h('span', { class: `badge ${r.ok ? 'ok' : 'warn'}`, text: health }),
        S.latencyFigure(r.latency_p50_ms, r.latency_p95_ms), S.requestsFigure(r.requests, r.failures),
        r.last_success_unix_ms == null ? '—' : fmtDate(r.last_success_unix_ms)];
    });
    const phases = sys.phase_history.slice().reverse().slice(0, 30).map((x) => [fmtDate(x.at_ms), S.systemPhase[x.phase] || x.phase, x.batch_id == null ? '—' : String(x.batch_id)]);
    const swaps = (sys.memory_swaps || []).slice().reverse().slice(0, 30).map((x) => [fmtDate(x.at_ms), x.to === 'stt' ? S.stt : S.evaluators, S.mib(x.before_mb), S.mib(x.after_mb), `${S.mib(x.device_free_before_mb)} → ${S.mib(x.device_free_after_mb)}`]);
    const procs = sys.process_history.slice().reverse().slice(0, 30).map((x) => [fmtDate(x.at_unix_ms), x.slot, `${x.event} (pid ${x.pid})`, x.detail]);
    return [
      h('h2', { text: S.adminTabs.models }),
      h('p', { text: `${S.phaseNow}: ${S.systemPhase[sys.phase] || sys.phase}. ${S.queues(sys.queues)}` }),
      table(S.adminTabs.models, [S.role, S.model, S.file, S.memory, S.loaded, S.processCol], rows, { 'data-testid': 'models' }),
      remote.length ? table(S.remoteServers, [S.role, S.server, S.serverHealth, S.latency, S.requests, S.lastSuccess], remote, { 'data-testid': 'remote-servers' }) : null,
      table(S.phaseHistory, [S.when, S.phase, S.batch], phases),
      swaps.length ? table(S.memorySwaps, [S.when, S.switchedTo, S.heldBefore, S.heldAfter, S.deviceFree], swaps, { 'data-testid': 'memory-swaps' }) : null,
      table(S.processHistory, [S.when, S.role, S.event, S.detail], procs),
    ];
  }

  async function platforms(p) {
    const out = h('div', {});
    const msg = h('div', { 'aria-live': 'polite' });
    p.append(h('h2', { text: S.platformsTitle }), msg, out);
    const base = (ctx.data.base || location.origin).replace(/\/$/, '');
    const regUrl = `${base}/lti/register`;
    // A one-time registration URL (shown once; it works once, for an hour).
    const inviteForm = () => {
      const issuer = h('input', { id: 'invite-issuer', type: 'url' });
      const shown = h('div', { 'aria-live': 'polite', 'data-testid': 'invite-url' });
      const make = h('button', { type: 'button', class: 'primary', text: S.makeInvite, on: { click: async () => {
        try {
          const r = await api.post('/api/v1/admin/platforms/invites', issuer.value ? { issuer: issuer.value } : {});
          clear(shown, h('p', { text: S.inviteMade }), h('p', {}, h('code', { text: r.url })));
        } catch (e) { clear(shown, notice('error', errorText(e))); }
      } } });
      return h('div', {}, h('label', { for: 'invite-issuer', text: S.inviteIssuer }), issuer, make, shown);
    };
    const render = async () => {
      let list;
      try { list = await api.get('/api/v1/admin/platforms'); } catch (e) { clear(out, notice('error', S.loadFailed(errorText(e)))); return; }
      const rows = list.map((r) => [r.name || r.issuer, r.issuer, r.client_id, (r.deployments || []).join(', '), r.source,
        h('button', { type: 'button', class: 'danger', text: S.remove, 'aria-label': `${S.remove}: ${r.issuer} ${r.client_id}`, on: { click: async () => {
          try { await api.del(`/api/v1/admin/platforms?issuer=${enc(r.issuer)}&client_id=${enc(r.client_id)}`); announce(S.removed); render(); }
          catch (e) { clear(msg, notice('error', errorText(e))); }
        } } })]);
      clear(out,
        list.length ? table(S.platformsTitle, [S.name, S.issuer, S.clientId, S.deployments, S.source, S.actions], rows, { 'data-testid': 'platforms' }) : h('p', { text: S.noPlatforms }),
        h('section', { 'data-testid': 'dynreg' }, h('h3', { text: S.dynregTitle }), h('p', { text: S.dynregHelp(regUrl) }),
          inviteForm(), h('p', { text: S.canvasUrl(`${base}/lti/canvas.json`) }),
          h('p', {}, h('a', { href: '/lti/register', target: '_blank', rel: 'noopener', text: S.allValues }))));
    };
    render();
  }

  async function pluginsView(p) {
    const out = h('div', {});
    const msg = h('div', { 'aria-live': 'polite', 'data-testid': 'plugin-message' });
    const file = h('input', { type: 'file', accept: '.wasm,application/wasm', 'data-testid': 'plugin-file' });
    const up = h('button', { type: 'button', class: 'primary', text: S.uploadPluginButton, on: { click: async () => {
      const f = file.files[0];
      if (!f) return;
      try {
        const r = await api.req('POST', '/api/v1/plugins', f, { 'Content-Type': 'application/wasm' });
        clear(msg, notice('ok', S.pluginUploaded(r.name, r.version)));
        announce(S.pluginUploaded(r.name, r.version));
        render();
      } catch (e) { clear(msg, notice('error', errorText(e))); announce(errorText(e), true); }
    } } });
    p.append(h('h2', { text: S.pluginsTitle }), msg, out,
      h('section', {}, h('h3', { text: S.uploadPlugin }), field(S.uploadPlugin, file), h('div', { class: 'buttons' }, up)));
    const render = async () => {
      let list, failures;
      try {
        [list, failures] = await Promise.all([api.get('/api/v1/plugins'), api.get('/api/v1/admin/plugin-failures')]);
      } catch (e) { clear(out, notice('error', S.loadFailed(errorText(e)))); return; }
      const rows = list.map((x) => [x.name, x.version, x.builtin ? S.builtin : x.context_id ? S.course(x.context_id) : S.site, x.enabled ? S.yes : S.no,
        x.builtin ? '—' : h('button', { type: 'button', text: x.enabled ? S.disable : S.enable, 'aria-label': `${x.enabled ? S.disable : S.enable}: ${x.name} ${x.version}`, on: { click: async () => {
          try { await api.post(`/api/v1/plugins/${enc(x.id)}/${x.enabled ? 'disable' : 'enable'}`); render(); }
          catch (e) { clear(msg, notice('error', errorText(e))); }
        } } })]);
      const fails = failures.map((f) => [fmtDate(f.at), f.plugin, f.submission_id, String(f.attempts), f.error]);
      clear(out,
        table(S.pluginsTitle, [S.name, S.version, S.scope, S.enabled, S.actions], rows, { 'data-testid': 'plugins' }),
        h('h3', { text: S.pluginFailures }),
        fails.length ? table(S.pluginFailures, [S.when, S.plugin, S.submission, S.attempts, S.error], fails) : h('p', { text: S.noFailures }));
    };
    render();
  }

  // GET /api/v1/admin/doctor: one row per check, its fix beside it.
  async function doctorView(p) {
    const out = h('div', { 'aria-live': 'polite' });
    const load = h('input', { type: 'checkbox', id: 'doctor-load' });
    const again = h('button', { type: 'button', class: 'primary', text: S.doctorRun, on: { click: () => run() } });
    p.append(h('h2', { text: S.adminTabs.doctor }), h('p', { class: 'help', text: S.doctorHelp }),
      h('div', { class: 'field check' }, load, h('label', { for: 'doctor-load', text: S.doctorLoad })),
      h('div', { class: 'buttons' }, again), out);
    const badge = (st) => h('span', { class: `badge ${st === 'ok' ? 'ok' : st === 'warn' ? 'warn' : 's-failed'}`, text: S.doctorStatus[st] || st });
    const run = async () => {
      again.disabled = true;
      clear(out, h('p', { text: S.doctorRunning }));
      try {
        const r = await api.get(`/api/v1/admin/doctor${load.checked ? '?load_models=true' : ''}`);
        const n = (st) => r.checks.filter((c) => c.status === st).length;
        clear(out,
          notice(r.ok ? (n('warn') ? 'warn' : 'ok') : 'error', h('p', { 'data-testid': 'doctor-summary', text: S.doctorSummary(r.checks.length, n('ok'), n('warn'), n('fail')) })),
          table(S.adminTabs.doctor, [S.statusCol, S.check, S.finding, S.whatToDo],
            r.checks.map((c) => h('tr', { class: `doctor-${c.status}` }, h('td', {}, badge(c.status)), h('td', {}, h('code', { text: c.name })), h('td', { text: c.summary }), h('td', { text: c.fix || '—' }))),
            { 'data-testid': 'doctor', class: 'doctor' }));
      } catch (e) { clear(out, notice('error', S.loadFailed(errorText(e)))); }
      again.disabled = false;
    };
    run();
  }

  async function audit(p) {
    const out = h('div', {});
    p.append(h('h2', { text: S.adminTabs.audit }), out);
    try {
      const list = await api.get('/api/v1/admin/audit?limit=200');
      clear(out, list.length ? table(S.adminTabs.audit, [S.when, S.actor, S.action, S.subject, S.detail],
        list.map((e) => [fmtDate(e.at), e.actor, e.action, e.subject, JSON.stringify(e.details)])) : h('p', { text: S.auditEmpty }));
    } catch (e) { clear(out, notice('error', S.loadFailed(errorText(e)))); }
  }

  return () => t.dispose();
}
