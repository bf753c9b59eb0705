// Small DOM helpers: element creation, announcements, formatting, tabs.
import S, { locale } from './i18n.js';

let seq = 0;
export const uid = (p = 'v') => `${p}-${++seq}`;

// h('button', {class: 'x', on: {click}}, 'text', child, [more]) → Element.
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === 'on') for (const [ev, fn] of Object.entries(v)) el.addEventListener(ev, fn);
    else if (k === 'class') el.className = v;
    else if (k === 'text') el.textContent = v;
    else if (k === 'value' || k === 'checked' || k === 'disabled' || k === 'hidden' || k === 'selected') el[k] = v;
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children) {
    if (c === null || c === undefined || c === false) continue;
    if (Array.isArray(c)) append(el, c);
    else el.append(c instanceof Node ? c : String(c));
  }
}

export function clear(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

// Polite announcements for screen readers (one shared live region).
export function announce(msg, assertive = false) {
  const el = document.getElementById(assertive ? 'viva-alert' : 'viva-live');
  if (!el) return;
  el.textContent = '';
  // A fresh text node after a tick makes screen readers read repeated messages.
  setTimeout(() => { el.textContent = msg; }, 30);
}

// A message box: kind = info | ok | error.
export function notice(kind, ...children) {
  return h('div', { class: `notice ${kind}`, role: kind === 'error' ? 'alert' : null }, ...children);
}

export function fmtBytes(n) {
  if (n < 1024) return `${n} B`;
  const units = ['KB', 'MB', 'GB'];
  let v = n / 1024, i = 0;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return `${v.toFixed(v < 10 ? 1 : 0)} ${units[i]}`;
}

export function fmtClock(ms) {
  const s = Math.max(0, Math.floor(ms / 1000));
  return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, '0')}`;
}

export function fmtDate(ms) {
  return new Date(ms).toLocaleString(locale, { dateStyle: 'medium', timeStyle: 'medium' });
}

export function fmtPoints(x) {
  return Number.isInteger(x) ? String(x) : (Math.round(x * 100) / 100).toString();
}

// Labelled form control: returns [label, control, help?] wrapped in a div.
export function field(labelText, control, help) {
  const id = control.id || (control.id = uid('f'));
  const wrap = h('div', { class: 'field' }, h('label', { for: id, text: labelText }), control);
  if (help) {
    const hid = uid('h');
    control.setAttribute('aria-describedby', hid);
    wrap.append(h('p', { class: 'help', id: hid, text: help }));
  }
  return wrap;
}

// A checkbox with its label beside it (after it, as forms usually place it).
export function checkField(labelText, box) {
  const id = box.id || (box.id = uid('f'));
  return h('div', { class: 'field check' }, box, h('label', { for: id, text: labelText }));
}

// Accessible tabs (WAI-ARIA tabs pattern: arrow keys move between tabs).
// tabs = [{id, label, render(panel)}]; returns the container.
export function tabs(label, list, initial) {
  const bar = h('div', { role: 'tablist', 'aria-label': label, class: 'tabs' });
  const panel = h('div', { role: 'tabpanel', class: 'tabpanel', tabindex: '0' });
  const buttons = list.map((t) =>
    h('button', {
      type: 'button', role: 'tab', id: uid('tab'), 'data-tab': t.id, 'aria-selected': 'false', tabindex: '-1',
      text: t.label, on: { click: () => select(t.id) },
    }));
  bar.append(...buttons);
  bar.addEventListener('keydown', (e) => {
    const i = buttons.indexOf(document.activeElement);
    if (i < 0) return;
    let j = null;
    if (e.key === 'ArrowRight') j = (i + 1) % buttons.length;
    else if (e.key === 'ArrowLeft') j = (i - 1 + buttons.length) % buttons.length;
    else if (e.key === 'Home') j = 0;
    else if (e.key === 'End') j = buttons.length - 1;
    if (j !== null) { e.preventDefault(); select(list[j].id); buttons[j].focus(); }
  });
  let cleanup = null;
  function select(id) {
    const i = Math.max(0, list.findIndex((t) => t.id === id));
    buttons.forEach((b, k) => {
      b.setAttribute('aria-selected', k === i ? 'true' : 'false');
      b.tabIndex = k === i ? 0 : -1;
    });
    panel.setAttribute('aria-labelledby', buttons[i].id);
    if (typeof cleanup === 'function') cleanup();
    panel.replaceChildren();
    cleanup = list[i].render(panel);
  }
  const wrap = h('div', { class: 'tabset' }, bar, panel);
  wrap.select = select;
  wrap.dispose = () => { if (typeof cleanup === 'function') cleanup(); cleanup = null; };
  select(initial || list[0].id);
  return wrap;
}

// A table with a caption and column headers; rows are arrays of cells.
export function table(caption, heads, rows, attrs = {}) {
  return h('div', { class: 'table-wrap' },
    h('table', attrs,
      h('caption', { text: caption }),
      h('thead', {}, h('tr', {}, heads.map((x) => h('th', { scope: 'col' }, x)))),
      h('tbody', {}, rows.map((r) => (r instanceof Node ? r : h('tr', {}, r.map((c) => h('td', {}, c))))))));
}

export function errorText(e) {
  return (e && e.message) || String(e);
}

export { S };
