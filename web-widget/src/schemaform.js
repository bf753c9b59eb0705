// A form generated from a plugin's configuration JSON Schema (the
// form-sized subset the plugin host accepts: an object of string, enum,
// integer, number and boolean properties with title, description, default,
// minimum and maximum). value() returns the configuration object.
import S from './i18n.js';
import { h, uid } from './ui.js';

export function schemaForm(schema, value) {
  const props = (schema && schema.properties) || {};
  const getters = [];
  const fields = Object.entries(props).map(([key, p]) => {
    const id = uid('cfg');
    const cur = value && key in value ? value[key] : p.default;
    const label = p.title || key;
    const helpId = p.description ? uid('cfgh') : null;
    let input;
    if (p.type === 'boolean') {
      input = h('input', { type: 'checkbox', id, checked: !!cur, 'data-key': key, 'aria-describedby': helpId });
      getters.push([key, () => input.checked]);
      return h('div', { class: 'field check' }, input, h('label', { for: id, text: label }),
        helpId ? h('p', { class: 'help', id: helpId, text: p.description }) : null);
    }
    if (Array.isArray(p.enum)) {
      input = h('select', { id, 'data-key': key, 'aria-describedby': helpId },
        p.enum.map((v) => h('option', { value: JSON.stringify(v), text: String(v), selected: v === cur })));
      getters.push([key, () => JSON.parse(input.value)]);
    } else if (p.type === 'integer' || p.type === 'number') {
      input = h('input', {
        type: 'number', id, 'data-key': key, 'aria-describedby': helpId, inputmode: p.type === 'integer' ? 'numeric' : 'decimal',
        step: p.type === 'integer' ? '1' : 'any', min: p.minimum, max: p.maximum, value: cur == null ? '' : String(cur),
      });
      getters.push([key, () => (input.value === '' ? undefined : Number(input.value))]);
    } else {
      input = h(p.maxLength > 200 ? 'textarea' : 'input', { id, 'data-key': key, 'aria-describedby': helpId, value: cur == null ? '' : String(cur) });
      getters.push([key, () => input.value]);
    }
    return h('div', { class: 'field' }, h('label', { for: id, text: label }), input,
      helpId ? h('p', { class: 'help', id: helpId, text: p.description }) : null);
  });
  const el = h('div', { class: 'schema-form', 'data-testid': 'plugin-form' }, fields.length ? fields : h('p', { class: 'muted', text: S.none }));
  el.value = () => {
    const out = {};
    for (const [k, get] of getters) {
      const v = get();
      if (v !== undefined && !(typeof v === 'number' && Number.isNaN(v))) out[k] = v;
    }
    return out;
  };
  // Client-side check of bounds before asking the plugin.
  el.problems = () => Object.entries(props).flatMap(([k, p]) => {
    const v = el.value()[k];
    if (typeof v === 'number') {
      if (p.type === 'integer' && !Number.isInteger(v)) return [`${p.title || k}: whole number`];
      if (p.minimum != null && v < p.minimum) return [`${p.title || k} ≥ ${p.minimum}`];
      if (p.maximum != null && v > p.maximum) return [`${p.title || k} ≤ ${p.maximum}`];
    }
    return [];
  });
  return el;
}
