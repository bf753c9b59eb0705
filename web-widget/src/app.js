// Entry point: reads the page data (LTI launch) or the URL fragment
// (standalone /app#token=…), says who is signed in, and shows the view for
// the session's roles: student, instructor (course) or administrator.
import S from './i18n.js';
import { Api } from './api.js';
import { h, clear, tabs, notice, errorText } from './ui.js';

const root = document.getElementById('viva-app');
const data = JSON.parse(document.getElementById('viva-data').textContent || '{}');

function fromFragment() {
  const p = new URLSearchParams(location.hash.replace(/^#/, ''));
  // The fragment never reaches the server; drop it from the address bar and
  // history too.
  if (location.hash) history.replaceState(null, '', location.pathname + location.search);
  return { token: p.get('token'), assignment: p.get('assignment'), view: p.get('view') };
}

async function main() {
  const frag = data.standalone ? fromFragment() : {};
  const token = data.token || frag.token;
  const live = h('div', { id: 'viva-live', class: 'sr-only', 'aria-live': 'polite', role: 'status' });
  const alert = h('div', { id: 'viva-alert', class: 'sr-only', 'aria-live': 'assertive', role: 'alert' });
  const me = h('p', { id: 'me', class: 'me', text: S.connecting });
  const main = h('main', { id: 'viva-main', class: 'viva-main' });
  const header = h('header', { class: 'viva-header' }, h('h1', { id: 'viva-title', text: document.title || S.appName }), me);
  clear(root, header, main, live, alert);
  if (!token) {
    me.textContent = '';
    main.append(notice('error', S.noToken));
    document.body.setAttribute('data-ready', 'error');
    return;
  }
  const api = new Api(token);
  let who;
  try {
    who = await api.get('/api/v1/me');
  } catch (e) {
    me.textContent = S.loadFailed(errorText(e));
    document.body.setAttribute('data-ready', 'error');
    return;
  }
  me.textContent = S.signedIn(who.name || who.user_id, who.roles.map((r) => S.roleNames[r] || r).join(', '), who.context_title || who.context_id);
  const ctx = { api, data, me: who, assignmentId: data.assignment || frag.assignment || null, main };
  const views = [];
  if (who.viva_admin) views.push({ id: 'admin', label: S.views.admin, load: () => import('./admin.js') });
  if (who.roles.includes('instructor') || who.roles.includes('admin')) views.push({ id: 'instructor', label: S.views.instructor, load: () => import('./instructor.js') });
  if (!views.length || who.roles.includes('learner')) views.push({ id: 'student', label: S.views.student, load: () => import('./student.js') });
  const show = (v, panel) => {
    let stop = null, gone = false;
    v.load().then((m) => { if (!gone) stop = m.mount(panel, ctx); }).catch((e) => panel.append(notice('error', S.loadFailed(errorText(e)))));
    return () => { gone = true; if (typeof stop === 'function') stop(); };
  };
  if (views.length === 1) {
    const panel = h('div', { class: 'view', 'data-view': views[0].id });
    main.append(panel);
    show(views[0], panel);
  } else {
    const initial = views.find((v) => v.id === frag.view) ? frag.view : views[0].id;
    main.append(tabs(S.viewNav, views.map((v) => ({
      id: v.id, label: v.label,
      render: (panel) => { panel.setAttribute('data-view', v.id); return show(v, panel); },
    })), initial));
  }
  document.body.setAttribute('data-ready', '1');
}

main().catch((e) => {
  root.append(notice('error', S.loadFailed(errorText(e))));
  document.body.setAttribute('data-ready', 'error');
});
