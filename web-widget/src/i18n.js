// The widget's strings in the reader's language. Every module imports the
// catalogue from here (`import S from './i18n.js'`) and reads `S.key` or
// calls `S.key(args)`; `t('a.b', …args)` does the same by name.
//
// The language is, in order: the one the daemon chose for the page (an LTI
// launch's launch_presentation.locale claim, else the browser's
// Accept-Language; page data `locale`), else the browser's own list
// (navigator.languages), else English. A catalogue lacking a key falls back
// to English, but the test `the_french_catalogue_has_every_key_of_the_english_one`
// keeps every catalogue complete.
//
// Adding a string: add the key to strings.en.js AND to every other
// strings.<lang>.js (French: strings.fr.js). Adding a language: write
// strings.<lang>.js with every key, import it below, and add its code to
// LOCALES in daemon/src/http/widget.rs.
import en from './strings.en.js';
import fr from './strings.fr.js';

export const CATALOGUES = { en, fr };

// The first supported language among `tags` (BCP 47: "fr-CA" → "fr").
export function pickLocale(tags) {
  for (const tag of tags) {
    const primary = String(tag || '').toLowerCase().split(/[-_]/)[0];
    if (Object.hasOwn(CATALOGUES, primary)) return primary;
  }
  return 'en';
}

function pageLocale() {
  try {
    const el = document.getElementById('viva-data');
    return JSON.parse((el && el.textContent) || '{}').locale || null;
  } catch {
    return null;
  }
}

export const locale = pickLocale([pageLocale(), ...(navigator.languages || []), navigator.language]);
document.documentElement.lang = locale;

// Values of `over`, English where it has none (nested objects merged).
function merge(base, over) {
  const out = {};
  for (const [k, v] of Object.entries(base)) {
    const o = over ? over[k] : undefined;
    out[k] = v && typeof v === 'object' && !Array.isArray(v) ? merge(v, o) : (o ?? v);
  }
  return out;
}

const S = locale === 'en' ? en : merge(en, CATALOGUES[locale]);

// A string by its dotted key; functions are called with `args`.
export function t(key, ...args) {
  const v = key.split('.').reduce((o, k) => (o == null ? o : o[k]), S);
  return typeof v === 'function' ? v(...args) : (v ?? key);
}

// Language names in the reader's language ("fr" → "français").
export function languageName(code) {
  try {
    return new Intl.DisplayNames([locale], { type: 'language' }).of(code) || code;
  } catch {
    return code;
  }
}

export default S;
