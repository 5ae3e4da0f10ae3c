// The Drover dashboard: a single page in plain JavaScript. It reads the REST API with
// the session cookie, and listens to /api/v1/events to re-fetch only what changed.
// Text from the server is always inserted as text (never as HTML).
'use strict';

// Errors the page ran into, for the browser tests to read (WebDriver cannot hook the
// console before the page loads). Kept first, after the strict-mode directive.
window.__droverErrors = [];
window.addEventListener('error', (e) => window.__droverErrors.push(String(e.message)));
window.addEventListener('unhandledrejection', (e) => window.__droverErrors.push(String(e.reason)));

const $ = (id) => document.getElementById(id);
const PAGE = 50;
let me = null; // who is logged in: {role, name}
let current = null; // the view on screen: {refresh(events)}

// ---------------------------------------------------------------- building the DOM

function h(tag, attrs, ...children) {
  return build(document.createElement(tag), attrs, children);
}

function svg(tag, attrs, ...children) {
  return build(document.createElementNS('http://www.w3.org/2000/svg', tag), attrs, children);
}

function build(el, attrs, children) {
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith('on')) el.addEventListener(name.slice(2), value);
    else el.setAttribute(name, value === true ? '' : value);
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

// Each cell is labelled with its column, which is what a phone shows beside it when the
// table is laid out as cards.
function table(headings, rows, empty) {
  if (rows.length === 0) return h('p', { class: 'muted' }, empty || 'Nothing here.');
  const labels = headings.map((t) => (t instanceof Node ? t.getAttribute('data-label') || t.textContent : t));
  for (const row of rows) {
    [...row.children].forEach((cell, i) => {
      if (!cell.hasAttribute('data-label')) cell.setAttribute('data-label', labels[i] || '');
    });
  }
  return h('table', {},
    h('thead', {}, h('tr', {}, headings.map((t) => h('th', { scope: 'col' }, t)))),
    h('tbody', {}, rows));
}

const state = (name) => h('span', { class: `state ${name}` }, name.replace('_', ' '));
const plural = (n, word) => `${n} ${word}${n === 1 ? '' : 's'}`;
const are = (n) => (n === 1 ? 'is' : 'are');
const platform = (x) => `${x.os}/${x.arch}`;
const enc = encodeURIComponent;
const query = (params) => new URLSearchParams(
  Object.entries(params).filter(([, v]) => v !== '' && v !== null && v !== undefined)).toString();

function duration(seconds) {
  if (seconds < 60) return `${Math.round(seconds)}s`;
  if (seconds < 3600) return `${Math.round(seconds / 60)}m`;
  if (seconds < 86400) return `${Math.round(seconds / 3600)}h`;
  return `${Math.round(seconds / 86400)}d`;
}

function relative(rfc3339) {
  const seconds = (Date.now() - Date.parse(rfc3339)) / 1000;
  return seconds >= 0 ? `${duration(seconds)} ago` : `in ${duration(-seconds)}`;
}

// The one time format: relative on screen, the absolute time on hover. The clock below
// keeps every such text current.
function when(rfc3339) {
  if (!rfc3339) return '';
  return h('time', { datetime: rfc3339, title: new Date(rfc3339).toLocaleString() }, relative(rfc3339));
}

function tickClocks() {
  for (const el of document.querySelectorAll('time[datetime]')) {
    const text = relative(el.getAttribute('datetime'));
    if (el.textContent !== text) el.textContent = text;
  }
}

function bytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1048576) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / 1048576).toFixed(1)} MiB`;
}

// Semver order: numbers compared as numbers, a pre-release before its release.
function semverCompare(a, b) {
  const split = (v) => {
    const [core, pre] = v.split('+')[0].split(/-(.*)/s);
    return { core: core.split('.').map(Number), pre: pre ? pre.split('.') : [] };
  };
  const x = split(a), y = split(b);
  for (let i = 0; i < 3; i++) if ((x.core[i] || 0) !== (y.core[i] || 0)) return (x.core[i] || 0) - (y.core[i] || 0);
  if (!x.pre.length || !y.pre.length) return y.pre.length - x.pre.length;
  for (let i = 0; i < Math.max(x.pre.length, y.pre.length); i++) {
    if (x.pre[i] === undefined) return -1;
    if (y.pre[i] === undefined) return 1;
    const m = Number(x.pre[i]), n = Number(y.pre[i]);
    if (x.pre[i] !== y.pre[i]) return Number.isNaN(m) || Number.isNaN(n) ? (x.pre[i] < y.pre[i] ? -1 : 1) : m - n;
  }
  return 0;
}

// ---------------------------------------------------------------- talking to the server

// Every call carries X-Drover: the server refuses cookie-authenticated changes without
// it, which is what keeps other sites from acting through the cookie.
async function api(method, path, body) {
  const headers = { 'X-Drover': '1' };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const response = await fetch(path, {
    method, headers, credentials: 'same-origin',
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = await response.json().catch(() => null);
  if (response.status === 401) {
    showLogin('Your session ended; log in again.');
    throw new Error('not logged in');
  }
  if (!response.ok) throw new Error((data && data.detail) || `${response.status} ${response.statusText}`);
  return data;
}

const get = (path) => api('GET', path);
const canAct = () => me !== null && (me.role === 'operator' || me.role === 'admin');

// Sites and clients by id, read once and again after a settings note; the views that
// show names wait for it, so a name never shows as an id.
let directory = null;
function names() {
  if (!directory) {
    directory = Promise.all([get('/api/v1/sites'), get('/api/v1/clients')]).then(([sites, clients]) => ({
      sites: new Map(sites.map((s) => [s.id, s])),
      clients: new Map(clients.map((c) => [c.id, c])),
    })).catch((err) => {
      directory = null;
      throw err;
    });
  }
  return directory;
}
const siteName = (dir, id) => (dir.sites.get(id) || { name: id }).name;
const clientOf = (dir, siteId) => dir.clients.get((dir.sites.get(siteId) || {}).client_id);

// Agents' hostnames by id, for the audit log; filled as entries name them.
const hostnames = new Map();

function toast(message, isError) {
  const el = $('toast');
  el.textContent = message;
  el.className = isError ? 'error' : '';
  el.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { el.hidden = true; }, isError ? 8000 : 4000);
}

// Resolves with the values of the dialog's fields (an object, so truthy) when the
// operator confirms, false otherwise. The text says what will happen, with numbers. A
// dangerous action has a red button; with `typed`, the operator types that text (the
// version) before the button works; `fields` are extra inputs ({name, label, hint}).
function confirmAction(text, label, options) {
  const { danger, typed, fields } = options || {};
  const dialog = $('confirm');
  const ok = $('confirm-ok');
  const input = $('confirm-typed');
  $('confirm-text').textContent = text;
  ok.textContent = label;
  ok.className = danger ? 'danger' : 'primary';
  $('confirm-type').hidden = !typed;
  $('confirm-type-label').textContent = typed ? `Type ${typed} to confirm` : '';
  input.value = '';
  ok.disabled = Boolean(typed);
  input.oninput = () => { ok.disabled = input.value.trim() !== typed; };
  const inputs = (fields || []).map((f) => h('input', {
    type: 'text', name: f.name, id: `confirm-field-${f.name}`, placeholder: f.hint, autocomplete: 'off',
  }));
  $('confirm-fields').replaceChildren(...(fields || []).map((f, i) => h('label', { class: 'field' }, f.label, inputs[i])));
  dialog.showModal();
  (typed ? input : $('confirm-cancel')).focus();
  return new Promise((resolve) => {
    const done = (answer) => () => {
      ok.onclick = null;
      $('confirm-cancel').onclick = null;
      dialog.onclose = null;
      input.oninput = null;
      if (dialog.open) dialog.close();
      resolve(answer && Object.fromEntries(inputs.map((el) => [el.name, el.value.trim()])));
    };
    ok.onclick = done(true);
    $('confirm-cancel').onclick = done(false);
    dialog.onclose = done(false);
  });
}

// Runs an action after confirmation, reports it, and shows the view afresh.
async function act(text, label, run, success, options) {
  const values = await confirmAction(text, label, options);
  if (!values) return;
  try {
    await run(values);
    toast(success);
  } catch (err) {
    toast(err.message, true);
  }
  if (current) current.refresh(null);
}

// `data-action` names the button for tests and styles: "Roll back" is `roll-back`.
const actionButton = (label, onclick, danger) => (canAct()
  ? h('button', {
    class: danger ? 'action danger' : 'action', type: 'button',
    'data-action': label.toLowerCase().replace(/ /g, '-'), onclick,
  }, label)
  : null);

// Handles a view's loader failing: the message goes where the data would have been.
function guard(target, load) {
  return (...args) => load(...args).catch((err) => {
    if (err.message !== 'not logged in') target.replaceChildren(h('p', { class: 'error' }, err.message));
  });
}

// ---------------------------------------------------------------- overview

let adoptionHours = 24;
const RANGES = [[6, '6 h'], [24, '24 h'], [168, '7 d'], [2160, '90 d']];

function overview(main) {
  const banners = h('div', { id: 'banners' });
  const counts = h('div', { class: 'cards' });
  const charts = h('div', { class: 'charts' });
  const active = h('div');
  const mirrors = h('div', { id: 'mirrors' });
  const adoption = h('div', { class: 'charts', id: 'adoption' });
  const ranges = h('div', { class: 'ranges', role: 'group', 'aria-label': 'time range' });
  main.append(banners, h('h2', {}, 'Agents'), counts, h('h2', {}, 'Versions in the fleet'), charts,
    h('h2', {}, 'Version adoption over time'), ranges, adoption, h('h2', {}, 'Active rollouts'), active, mirrors);

  let fleet = null;
  let snapshots = [];
  const drawRanges = () => ranges.replaceChildren(...RANGES.map(([hours, label]) => h('button', {
    type: 'button', 'data-range': hours, 'aria-pressed': String(hours === adoptionHours),
    onclick: () => { adoptionHours = hours; drawRanges(); loadAdoption(); },
  }, label)));
  drawRanges();
  const drawAdoption = () => adoption.replaceChildren(...adoptionCharts(snapshots, fleet, adoptionHours));
  const loadFleet = guard(counts, async () => {
    const [summary, builds] = await Promise.all([get('/api/v1/fleet'), get('/api/v1/releases')]);
    fleet = summary;
    counts.replaceChildren(
      card('online', fleet.online, 'ok'), card('offline', fleet.offline, fleet.offline ? 'warn' : ''),
      card('total', fleet.total), card('paused', fleet.paused));
    charts.replaceChildren(...versionCharts(fleet.versions, builds));
    drawAdoption();
  });
  const loadAdoption = guard(adoption, async () => {
    snapshots = await get(`/api/v1/fleet/history?hours=${adoptionHours}`);
    drawAdoption();
  });
  let shown = null; // the rollouts, builds and mirrors on screen
  const loadRollouts = guard(active, async () => {
    const [rollouts, builds, mirrorList] = await Promise.all([get('/api/v1/rollouts'), get('/api/v1/releases'),
      get('/api/v1/mirrors')]);
    shown = { rollouts, builds, mirrorList };
    drawRollouts();
  });
  // Mirror health is counted from tasks' transfers: a task note may change it too.
  const rereadRollouts = guard(active, async (ids) => {
    const [mirrorList] = await Promise.all([get('/api/v1/mirrors'), reread(shown.rollouts, ids)]);
    shown.mirrorList = mirrorList;
    drawRollouts();
  });
  const drawRollouts = () => {
    const { rollouts, builds, mirrorList } = shown;
    const facts = rolloutFacts(rollouts, builds);
    banners.replaceChildren(...rolloutBanners(rollouts), ...mirrorBanners(mirrorList.mirrors));
    mirrors.replaceChildren(...mirrorSection(mirrorList.mirrors));
    active.replaceChildren(table(['Version', 'Kind', 'State', 'Wave', 'Progress', 'Build failures'],
      rollouts.filter(isOpen).map((r) => h('tr', {
        'data-rollout': r.id, 'data-version': r.version, 'data-kind': r.kind, class: failing(r) ? 'failing' : null,
      },
      h('td', {}, rolloutLink(r)), h('td', {}, r.kind), h('td', {}, stateCell(r)),
      h('td', { class: 'wave' }, waveText(r)),
      h('td', {}, progress(r, facts)),
      h('td', { class: r.failures.build ? 'failures bad' : 'failures' }, r.failures.build))),
      'No active rollouts.'));
  };
  return {
    title: 'Overview',
    refresh(events) {
      // A task moving changes no fleet count: the agent's version changes when it comes
      // back on it, which is an agent note.
      if (touches(events, 'agent', 'settings', 'release')) loadFleet();
      // Snapshots are taken every few minutes; the 30 s refresh is soon enough for them,
      // and the newest point is the fleet as it is now.
      if (events === null) loadAdoption();
      const ids = rolloutsNamed(events);
      if (ids === null || !shown) loadRollouts();
      else if (touches(events, 'task')) rereadRollouts(ids);
    },
  };
}

function card(name, value, tone) {
  return h('div', { class: `card ${tone || ''}`, 'data-count': name },
    h('span', { class: 'value' }, value), h('span', { class: 'muted' }, name));
}

// The newest build that is not rolled back, per platform: on stable, and what beta
// agents are offered (beta or stable).
function targets(builds) {
  const out = new Map();
  for (const b of builds.filter((x) => !x.blocked)) {
    const t = out.get(platform(b)) || {};
    if (b.channel === 'stable' && (!t.stable || semverCompare(b.version, t.stable) > 0)) t.stable = b.version;
    if (!t.beta || semverCompare(b.version, t.beta) > 0) t.beta = b.version;
    out.set(platform(b), t);
  }
  return out;
}

// One horizontal bar chart per platform: agents per version, the versions the stable and
// beta channels are due marked.
function versionCharts(versions, builds) {
  const platforms = new Map();
  for (const v of versions) {
    const key = platform(v);
    if (!platforms.has(key)) platforms.set(key, []);
    platforms.get(key).push(v);
  }
  if (platforms.size === 0) return [h('p', { class: 'muted' }, 'No agents yet.')];
  const due = targets(builds);
  return [...platforms].map(([name, rows]) => {
    const most = Math.max(...rows.map((r) => r.agents));
    const t = due.get(name) || {};
    const height = 24;
    const tags = (v) => [v === t.stable ? 'stable' : null, v === t.beta && t.beta !== t.stable ? 'beta' : null].filter(Boolean);
    // Agents behind the build their own channel is due: stable agents below the stable
    // target, beta agents below the beta one.
    const behind = (target, n) => rows.filter((r) => target && semverCompare(r.version, target) < 0)
      .reduce((sum, r) => sum + n(r), 0);
    const lagStable = behind(t.stable, (r) => r.agents - r.beta);
    const lagBeta = behind(t.beta, (r) => r.beta);
    const lagging = lagStable + lagBeta;
    return h('div', { class: 'chart', 'data-platform': name }, h('h3', {}, name),
      svg('svg', { viewBox: `0 0 500 ${rows.length * height}`, role: 'img', 'aria-label': `versions on ${name}` },
        rows.map((r, i) => svg('g', { transform: `translate(0 ${i * height})`, class: tags(r.version).map((x) => `target-${x}`).join(' ') },
          svg('text', { x: 0, y: 16 }, r.version),
          svg('text', { x: 62, y: 16, class: 'tag' }, tags(r.version).join(' ')),
          svg('rect', { x: 110, y: 4, height: 16, width: Math.max(2, (r.agents / most) * 250) }),
          svg('text', { x: 116 + Math.max(2, (r.agents / most) * 250), y: 16 },
            `${r.agents} (${r.online} online)`)))),
      t.beta ? h('p', { class: lagging ? 'lag' : 'muted', 'data-lagging': lagging },
        lagging ? `${plural(lagging, 'agent')} behind ${lagging === 1 ? 'its' : 'their'} channel's build `
          + `(${[t.stable ? `${lagStable} on stable, which is due ${t.stable}` : null,
            `${lagBeta} on beta, which is due ${t.beta}`].filter(Boolean).join('; ')})`
          : 'every agent runs its channel\'s build or newer') : null);
  });
}

function clockLabel(ms, spanMs) {
  const d = new Date(ms);
  if (spanMs > 2 * 86400e3) return d.toLocaleDateString(undefined, { month: 'short', day: 'numeric' });
  return d.toLocaleTimeString(undefined, { hour: '2-digit', minute: '2-digit' });
}

// One line chart per platform: agents per version at each snapshot, then now (the
// fleet's own counts, so a new fleet has a point at once). Axes: agents, and time.
function adoptionCharts(points, fleet, hours) {
  const now = Date.now();
  const all = points.map((p) => ({ ...p, ms: Date.parse(p.at) }));
  if (fleet) for (const v of fleet.versions) all.push({ ...v, ms: now, now: true });
  const platforms = new Map();
  for (const p of all) {
    const key = platform(p);
    if (!platforms.has(key)) platforms.set(key, { times: [], versions: new Map() });
    const chart = platforms.get(key);
    if (!chart.times.includes(p.ms)) chart.times.push(p.ms);
    if (!chart.versions.has(p.version)) chart.versions.set(p.version, new Map());
    chart.versions.get(p.version).set(p.ms, p.agents);
  }
  if (platforms.size === 0) return [h('p', { class: 'muted' }, 'No agents yet.')];
  const width = 500, height = 160, left = 36, right = 90, top = 8, bottom = 22;
  return [...platforms].map(([name, { times, versions }]) => {
    times.sort((a, b) => a - b);
    const most = Math.max(1, ...all.filter((p) => platform(p) === name).map((p) => p.agents));
    const from = Math.max(now - hours * 3600e3, Math.min(times[0], now - 600e3));
    const span = Math.max(1, now - from);
    const x = (ms) => left + ((ms - from) / span) * (width - left - right);
    const y = (n) => height - bottom - (n / most) * (height - top - bottom);
    const ticks = [...new Set([0, Math.round(most / 2), most])];
    const axes = svg('g', { class: 'axes' },
      svg('line', { x1: left, y1: height - bottom, x2: width - right, y2: height - bottom }),
      svg('line', { x1: left, y1: top, x2: left, y2: height - bottom }),
      ticks.map((n) => svg('text', { x: left - 4, y: y(n) + 4, 'text-anchor': 'end', class: 'tick', 'data-tick': n }, n)),
      [0, 0.5, 1].map((f) => svg('text', {
        x: left + f * (width - left - right), y: height - 6, 'text-anchor': f === 0 ? 'start' : (f === 1 ? 'end' : 'middle'), class: 'tick',
      }, f === 1 ? 'now' : clockLabel(from + f * span, span))));
    const lines = [...versions].map(([version, counts], k) => svg('g', { class: `series s${k % 6}`, 'data-version': version },
      times.length > 1 ? svg('polyline', { fill: 'none', points: times.map((t) => `${x(t)},${y(counts.get(t) || 0)}`).join(' ') }) : null,
      times.filter((t) => counts.has(t)).map((t) => svg('circle', { cx: x(t), cy: y(counts.get(t)), r: 3 },
        svg('title', {}, `${version}: ${plural(counts.get(t), 'agent')} ${t === now ? 'now' : `at ${new Date(t).toLocaleString()}`}`))),
      svg('text', { x: width - right + 8, y: top + 10 + k * 14 }, version)));
    return h('div', { class: 'chart', 'data-adoption': name }, h('h3', {}, name),
      svg('svg', { viewBox: `0 0 ${width} ${height}`, role: 'img', 'aria-label': `version adoption on ${name}` }, axes, lines));
  });
}

// A rollout is open while it can still start agents or be resumed.
const OPEN = ['running', 'waiting', 'paused', 'halted'];
const isOpen = (r) => OPEN.includes(r.state);
// Build failures in a rollout that goes on: shown red before they halt it.
const failing = (r) => r.failures.build > 0 && isOpen(r) && r.state !== 'halted';
const platforms = (r) => (r.platforms.length ? r.platforms.map(platform).join(', ') : '–');
const waveText = (r) => (r.waves.length ? `${r.current_wave + 1} of ${r.waves.length}` : '–');
// Random ids are long; their first characters tell rollouts apart on screen. The ids of
// rollouts started by a build landing name their kind, version and platform already.
const randomId = (id) => /^[0-9a-f]{8}-[0-9a-f]{4}-/.test(id);
const shortId = (id) => (randomId(id) ? id.slice(0, 8) : id);
const named = (r) => (randomId(r.id) ? `${r.kind} rollout ${shortId(r.id)} of ${r.version}` : `rollout ${r.id}`);
const unfinished = (r) => r.queued + r.in_progress;
const failedTotal = (r) => r.failed + r.rolled_back;
const rolloutLink = (r) => h('a', { href: `#/rollouts/${enc(r.id)}`, title: `rollout ${r.id}` }, r.version);

function stateCell(r) {
  return [state(r.state),
    failing(r) ? h('span', { class: 'marker failing', 'data-failing': r.failures.build },
      `failing: ${plural(r.failures.build, 'build failure')}`) : null,
    r.reason && ['halted', 'aborted', 'superseded'].includes(r.state) ? h('small', { class: 'reason' }, r.reason) : null];
}

// What the page knows about versions besides the rollouts: which are rolled back and
// which are on stable already.
function rolloutFacts(all, builds) {
  // A version is blocked as its builds say; one whose builds are gone from the listing
  // is taken as blocked while a rollback of it is open.
  const blocked = new Set(builds.filter((b) => b.blocked).map((b) => b.version));
  for (const r of all) {
    if (r.kind === 'rollback' && isOpen(r) && !builds.some((b) => b.version === r.version)) blocked.add(r.version);
  }
  const stable = new Set(builds.filter((b) => b.channel === 'stable').map((b) => b.version));
  const facts = { all, builds, blocked, stable, unblockOn: new Set() };
  // Unblock goes on the newest row of a blocked version (the list is newest first).
  for (const version of blocked) {
    const newest = all.find((r) => r.version === version);
    if (newest) facts.unblockOn.add(newest.id);
  }
  return facts;
}

const pct = (n, of) => `${of ? Math.floor((n / of) * 100) : 0}%`;

// Succeeded of targeted, in green; failed in red; under way in blue. The green is full
// only when every target succeeded, and grey when the version was rolled back since.
function progress(r, facts) {
  const blocked = facts && r.kind !== 'rollback' && facts.blocked.has(r.version);
  const segment = (n, cls) => {
    const s = h('span', { class: cls });
    s.style.width = n >= r.targeted && r.targeted ? '100%' : pct(n, r.targeted);
    return s;
  };
  const label = r.targeted === 0 ? 'no agent to update'
    : `${r.succeeded} / ${r.targeted} succeeded${blocked ? ` · ${r.version} rolled back` : ''}`;
  return h('div', {
    class: 'progress-cell', title: `${r.succeeded} of ${r.targeted} targeted agents succeeded`,
  },
  h('div', { class: blocked ? 'progress blocked' : 'progress', role: 'img', 'aria-label': label },
    segment(r.succeeded, 'ok'), segment(failedTotal(r), 'bad'), segment(r.in_progress, 'busy')),
  h('small', { class: 'muted' }, label));
}

function rolloutBanners(rollouts) {
  return [
    ...rollouts.filter((r) => r.state === 'halted').map((r) => h('div', { class: 'banner danger', 'data-banner': 'halted', 'data-rollout': r.id },
      h('span', {}, `The ${named(r)} (${platforms(r)}) is halted: ${r.reason || 'too many build failures'}. `
        + 'No agent is started on it until an operator resumes it. ', h('a', { href: `#/rollouts/${enc(r.id)}` }, 'Open it')),
      actionButton('Resume', () => resume(r)))),
    ...rollouts.filter((r) => r.kind === 'beta' && r.stale_stable).map((r) => h('div', { class: 'banner warn', 'data-banner': 'stale' },
      `Stable is stale on ${platforms(r)}: beta ${r.version} has been ahead of stable for `
      + `${duration(r.stable_lag_seconds || 0)}. Promote it or roll it back.`)),
  ];
}

// A mirror whose last downloads all fell back: agents still update, from the server.
function mirrorBanners(list) {
  return list.filter((m) => m.failing).map((m) => h('div', { class: 'banner warn', 'data-banner': 'mirror', 'data-mirror': m.url },
    `The download mirror ${m.url} is failing: its last downloads all fell back to the server`
    + `${m.last_fallback ? ` (${m.last_fallback.reason.replace('_', ' ')}${m.last_fallback.error ? `: ${m.last_fallback.error}` : ''})` : ''}. `
    + 'Agents still update, from the server, which now carries their downloads.'));
}

// Every mirror and how its downloads went over the last day; nothing without mirrors.
function mirrorSection(list) {
  if (!list.length) return [];
  const usedBy = (m) => (m.used_by.length ? m.used_by.map((u) => `${u.scope} ${u.name}`).join(', ') : 'no longer set');
  const fellBack = (m) => (m.fell_back
    ? `${m.fell_back} (${Object.entries(m.fallbacks).map(([why, n]) => `${why.replace('_', ' ')} ${n}`).join(', ')})` : '0');
  return [h('h2', {}, 'Download mirrors'), table(['Mirror', 'Health', 'Served (24 h)', 'Fell back (24 h)', 'Used by'],
    list.map((m) => h('tr', { 'data-mirror': m.url, class: m.failing ? 'failing' : null },
      h('td', { class: 'mono' }, m.url), h('td', {}, m.failing ? h('span', { class: 'bad' }, 'failing') : 'ok'),
      h('td', {}, m.served), h('td', { class: m.fell_back ? 'failures bad' : 'failures' }, fellBack(m)),
      h('td', {}, usedBy(m)))))];
}

// How a task's build reached the agent: from its mirror, or from the server and why,
// and whether as its compressed copy or a delta (with the bytes that crossed).
function transferNote(t) {
  if (!t.transfer) return null;
  const { source, fallback, kind } = t.transfer;
  const text = (source === 'mirror' ? 'from the mirror'
    : (fallback ? `from the server (mirror ${fallback.replace('_', ' ')})` : 'from the server'))
    + (kind === 'compressed' ? ', compressed' : kind === 'delta' ? ', as a delta' : '')
    + (kind && kind !== 'full' && t.transfer.bytes ? ` (${bytes(t.transfer.bytes)})` : '');
  return h('small', { class: 'muted transfer', title: t.transfer.fallback_error || t.transfer.mirror || '' }, text);
}

// ---------------------------------------------------------------- rollouts

function rollouts(main, _arg, params) {
  const banners = h('div');
  const body = h('div');
  const pager = h('div', { class: 'pager' });
  const version = params.get('version') || '';
  let offset = 0;
  main.append(h('h2', {}, version ? `Rollouts of ${version}` : 'Rollouts'),
    h('p', { hidden: !version }, h('a', { href: '#/rollouts' }, 'Every rollout')), banners, body, pager);
  let shown = null; // the rollouts and builds on screen
  const load = guard(body, async () => {
    const [all, builds] = await Promise.all([get(`/api/v1/rollouts?${query({ version, limit: PAGE, offset })}`),
      get('/api/v1/releases')]);
    shown = { all, builds };
    draw();
  });
  const rereadSome = guard(body, async (ids) => {
    await reread(shown.all, ids);
    draw();
  });
  const draw = () => {
    const { all, builds } = shown;
    const move = (by) => () => { offset = Math.max(0, offset + by); load(); };
    pager.replaceChildren(
      h('button', { type: 'button', disabled: offset === 0, onclick: move(-PAGE) }, '‹ Newer'),
      h('span', { id: 'rollouts-shown' }, all.length ? `${offset + 1}–${offset + all.length}` : ''),
      h('button', { type: 'button', disabled: all.length < PAGE, onclick: move(PAGE) }, 'Older ›'));
    const facts = rolloutFacts(all, builds);
    banners.replaceChildren(...rolloutBanners(all));
    body.replaceChildren(table(
      ['Version', 'Kind', 'Platforms', 'State', 'Wave', 'Funnel', 'Gate', ''],
      all.map((r) => h('tr', {
        'data-rollout': r.id, 'data-version': r.version, 'data-kind': r.kind, class: failing(r) ? 'failing' : null,
      },
      h('td', {}, rolloutLink(r),
        randomId(r.id) ? [' ', h('small', { class: 'muted mono' }, shortId(r.id))] : null,
        facts.blocked.has(r.version) ? h('span', { class: 'marker blocked' }, 'blocked') : null),
      h('td', { class: 'kind' }, r.kind), h('td', {}, platforms(r)),
      h('td', {}, stateCell(r)),
      h('td', { class: 'wave' }, waveText(r)),
      h('td', {}, funnel(r), progress(r, facts)),
      h('td', { class: 'gate' }, gateCell(r, facts)),
      h('td', { class: 'actions-cell' }, rolloutActions(r, facts)))),
      'No rollouts yet: a build published on beta, a promote or a rollback starts one.'));
    if (all.some(timeBound)) again(view, load);
  };
  const view = {
    title: 'Rollouts',
    refresh(events) {
      const ids = rolloutsNamed(events);
      if (ids === null || !shown) load();
      else if (ids.size) rereadSome(ids);
    },
  };
  return view;
}

// A beta rollout's gate, as it bears on a promote: ready, not yet (the usual state
// before a promote, not an error), done (the version is on stable), or blocked.
function gateCell(r, facts) {
  if (!r.gate) return '—';
  if (facts.blocked.has(r.version)) {
    return [h('span', { class: 'state failed', 'data-gate': 'blocked' }, 'blocked'), ' ',
      h('small', {}, `${r.version} was rolled back; unblock it to promote it`)];
  }
  if (facts.stable.has(r.version)) {
    return [h('span', { class: 'state completed', 'data-gate': 'promoted' }, 'promoted'), ' ',
      h('small', {}, `${r.version} is on stable`)];
  }
  return r.gate.pass
    ? [h('span', { class: 'state succeeded', 'data-gate': 'ready' }, 'ready'), ' ', h('small', {}, r.gate.reason)]
    : [h('span', { class: 'state pending', 'data-gate': 'not-ready' }, 'not ready'), ' ', h('small', {}, r.gate.reason)];
}

const STAGES = [['waiting', 'waiting'], ['queued', 'queued'],
  ['outside_window', 'outside window'], ['downloading', 'downloading'],
  ['installing', 'installing'], ['probation', 'on probation'], ['succeeded', 'succeeded']];
const OFF_ROAD = [['failed', 'failed'], ['rolled_back', 'rolled back'], ['cancelled', 'cancelled'], ['skipped', 'skipped']];

// Where the targets stand, stage by stage with the stage's name: the road to success,
// then the ways off it that happened. With `pick`, each stage is a button that lists
// its agents.
function funnel(counts, pick) {
  const part = (stage, label, n, bad) => {
    const attrs = { class: `stage${bad && n ? ' bad' : ''}${n ? '' : ' none'}`, 'data-stage': stage, 'data-count': n };
    return pick
      ? h('button', { ...attrs, type: 'button', onclick: () => pick(stage), title: `list the ${label} agents` }, `${n} ${label}`)
      : h('span', attrs, `${n} ${label}`);
  };
  const road = STAGES.map(([stage, label]) => part(stage, label, counts[stage]));
  const off = OFF_ROAD.filter(([stage]) => counts[stage] > 0)
    .map(([stage, label]) => part(stage, label, counts[stage], stage === 'failed' || stage === 'rolled_back'));
  const f = counts.failures || {};
  const classes = [['build', f.build], ['environment', f.environment], ['transient', f.transient]].filter(([, n]) => n > 0);
  return h('div', { class: 'funnel', title: `${counts.targeted} targeted` },
    road.flatMap((el, i) => (i ? [h('span', { class: 'arrow', 'aria-hidden': 'true' }, ' → '), el] : [el])),
    off.length ? [h('span', { class: 'muted' }, ' · '), off.flatMap((el, i) => (i ? [', ', el] : [el]))] : null,
    classes.length ? h('span', { class: 'classes' }, ' (failures by class: ',
      classes.map(([c, n], i) => [i ? ', ' : '', h('span', { class: `failure-class ${c}`, 'data-class': c }, `${c} ${n}`)]), ')') : null);
}

function rolloutActions(r, facts) {
  const running = r.state === 'running' || r.state === 'waiting';
  const promotable = r.kind === 'beta' && !facts.blocked.has(r.version)
    && facts.builds.some((b) => b.version === r.version && b.channel === 'beta');
  return [
    promotable ? actionButton(r.gate && !r.gate.pass ? 'Promote anyway' : 'Promote', () => promote(r, facts.all),
      r.gate && !r.gate.pass) : null,
    running ? actionButton('Pause', () => pause(r)) : null,
    r.state === 'paused' || r.state === 'halted' ? actionButton('Resume', () => resume(r)) : null,
    running && r.current_wave < r.waves.length - 1 ? actionButton('Advance', () => advance(r)) : null,
    isOpen(r) ? actionButton('Abort', () => abort(r), true) : null,
    r.kind !== 'rollback' && !facts.blocked.has(r.version) ? actionButton('Roll back', () => rollback(r, facts), true) : null,
    facts.unblockOn.has(r.id) ? actionButton('Unblock', () => unblock(r)) : null,
  ];
}

async function agentCount(filters) {
  return (await get(`/api/v1/agents?${query({ ...filters, limit: 0 })}`)).total;
}

// A promote flips the version's channel on every platform it has a build for; the gate
// shown is this beta rollout's. Past a failing gate, the version is typed to confirm.
async function promote(r, all) {
  const scope = [];
  for (const x of all.filter((x) => x.version === r.version && x.kind === 'beta')) {
    for (const p of x.platforms) if (!scope.some((q) => platform(q) === platform(p))) scope.push(p);
  }
  const counts = await Promise.all(scope.map((p) => agentCount(
    { channel: 'stable', os: p.os, arch: p.arch, older_than: r.version, paused: false })));
  const total = counts.reduce((a, b) => a + b, 0);
  const detail = scope.map((p, i) => `${platform(p)}: ${counts[i]}`).join(', ');
  const force = !r.gate.pass;
  const text = `Promote ${r.version} to stable: ${plural(total, 'stable agent')} will update (${detail}), wave by wave.`
    + (force ? ` The health gate fails on ${platforms(r)} (${r.gate.reason}); this promotes past it and is audited as forced.`
      : ` Health gate on ${platforms(r)}: ${r.gate.reason}.`);
  const only = r.platforms.length === 1 ? r.platforms[0] : {};
  // Empty fields leave the server's default plan.
  const fields = [
    { name: 'waves', label: 'Waves (cumulative, e.g. 1%,10%,50%,100%)', hint: "the server's default" },
    { name: 'bake', label: 'Bake between waves (e.g. 10m)', hint: "the server's default" },
  ];
  await act(text, force ? 'Promote anyway' : 'Promote',
    ({ waves, bake }) => api('POST', `/api/v1/rollouts/${enc(r.version)}/promote`, {
      os: only.os, arch: only.arch, force,
      waves: waves ? waves.split(',').map((w) => w.trim()).filter(Boolean) : undefined,
      bake: bake || undefined,
    }),
    `${r.version} is stable`, { fields, ...(force ? { danger: true, typed: r.version } : {}) });
}

async function pause(r) {
  await act(`Pause the ${named(r)}: none of its ${plural(r.waiting, 'waiting agent')} is started until it is resumed; `
    + `its ${plural(unfinished(r), 'update')} under way ${unfinished(r) === 1 ? 'goes' : 'go'} on `
    + `(${r.succeeded} of ${r.targeted} succeeded so far).`, 'Pause',
  () => api('POST', `/api/v1/rollouts/${enc(r.id)}/pause`), `${named(r)} paused`);
}

async function resume(r) {
  await act(`Resume the ${named(r)}: dispatch goes on to its ${plural(r.waiting, 'waiting agent')} `
    + `(so far ${r.succeeded} of ${r.targeted} succeeded, ${failedTotal(r)} failed, ${r.failures.build} build failures); `
    + 'build failures before now no longer count toward a halt.', 'Resume',
  () => api('POST', `/api/v1/rollouts/${enc(r.id)}/resume`), `${named(r)} resumed`);
}

async function advance(r) {
  const next = r.waves[r.current_wave + 1];
  await act(`Advance the ${named(r)} to wave ${r.current_wave + 2} of ${r.waves.length} (${next.share} of its targets) now, `
    + `without waiting for wave ${r.current_wave + 1} to pass and bake: ${plural(next.size, 'more agent')} may start.`, 'Advance',
  () => api('POST', `/api/v1/rollouts/${enc(r.id)}/advance`), `${named(r)} advanced`);
}

async function abort(r) {
  await act(`Abort the ${named(r)}: its ${plural(unfinished(r), 'unfinished update')} ${are(unfinished(r))} cancelled `
    + `and its ${plural(r.waiting, 'waiting agent')} ${are(r.waiting)} never started; the ${r.succeeded} that succeeded `
    + `stay on ${r.version}.`, 'Abort',
  () => api('POST', `/api/v1/rollouts/${enc(r.id)}/abort`), `${named(r)} aborted`, { danger: true });
}

// Where agents on `version` go when it is rolled back: per platform, the newest build of
// their channel that is not rolled back (beta agents may be offered beta builds too).
function goesBackTo(version, builds) {
  const newest = (list) => list.map((b) => b.version).sort(semverCompare).pop();
  return builds.filter((b) => b.version === version).map((b) => {
    const others = builds.filter((o) => platform(o) === platform(b) && o.version !== version && !o.blocked);
    return { platform: platform(b), stable: newest(others.filter((o) => o.channel === 'stable')), beta: newest(others) };
  });
}

function backText(back) {
  if (back.length === 0) return 'It has no build listed to go back from.';
  return back.map((p) => {
    if (!p.beta) return `Agents on ${p.platform} have no other build and stay on it.`;
    if (p.stable === p.beta) return `Agents on ${p.platform} go back to ${p.stable}.`;
    return `Agents on ${p.platform} go back to ${p.stable ? `${p.stable} (stable agents)` : 'nothing on stable (stable agents stay)'}`
      + ` and ${p.beta} (beta agents).`;
  }).join(' ');
}

async function rollback(r, facts) {
  const running = await agentCount({ version: r.version });
  const cancelled = facts.all.filter((x) => x.version === r.version && isOpen(x)).reduce((n, x) => n + unfinished(x), 0);
  const back = goesBackTo(r.version, facts.builds);
  await act(`Roll back ${r.version}: it is blocked on every platform, its ${plural(cancelled, 'unfinished update')} `
    + `${are(cancelled)} cancelled, and ${plural(running, 'agent')} running it will be moved to the newest other build of their `
    + `channel (paused agents and those declining updates are skipped). ${backText(back)}`, 'Roll back',
  () => api('POST', `/api/v1/rollouts/${enc(r.version)}/rollback`), `${r.version} is rolled back`,
  { danger: true, typed: r.version });
}

async function unblock(r) {
  const builds = (await get('/api/v1/releases')).filter((b) => b.version === r.version);
  const stable = builds.some((b) => b.channel === 'stable');
  const counts = await Promise.all(builds.map((b) => agentCount(
    { channel: stable ? '' : 'beta', os: b.os, arch: b.arch, older_than: r.version, paused: false })));
  const total = counts.reduce((a, b) => a + b, 0);
  await act(`Unblock ${r.version}: it is offered again on ${stable ? 'stable' : 'beta'}; `
    + `${plural(total, 'agent')} of its platforms run something older and may update to it.`, 'Unblock',
  () => api('POST', `/api/v1/rollouts/${enc(r.version)}/unblock`), `${r.version} is offered again`);
}

// ---------------------------------------------------------------- one rollout

const WAVE_WORDS = {
  pending: 'waiting for the wave before it',
  running: 'started',
  baking: 'passed; baking',
  passed: 'passed',
  halted: 'halted',
};

function waveLine(r, w) {
  const parts = [];
  if (w.state === 'pending') {
    parts.push(r.state === 'paused' || r.state === 'halted' ? `not started: the rollout is ${r.state}` : WAVE_WORDS.pending);
  }
  if (w.started_at) parts.push('started ', when(w.started_at));
  if (w.passed_at) parts.push(' · passed ', when(w.passed_at));
  if (w.state === 'baking' && w.bake_until) parts.push(' · baking until ', h('span', { class: 'until' }, new Date(w.bake_until).toLocaleTimeString()), ' (next wave ', when(w.bake_until), ')');
  if (w.state === 'halted') parts.push(' · halted', r.reason ? `: ${r.reason}` : '');
  return parts;
}

function rolloutPage(main, id) {
  const head = h('div');
  const waves = h('div', { class: 'waves' });
  const stages = h('div', { class: 'filters', id: 'stage-filter' });
  const list = h('div', { id: 'rollout-agents' });
  const pager = h('div', { class: 'pager' });
  const timeline = h('div', { id: 'timeline' });
  main.append(h('p', {}, h('a', { href: '#/rollouts' }, '‹ Rollouts')), head, h('h2', {}, 'Waves'), waves,
    h('h2', {}, 'Agents'), stages, list, pager, h('h2', {}, 'Timeline'), timeline);
  const pick = { stage: '', wave: '', offset: 0 };
  let record = null;

  const drawStages = () => {
    if (!record) return;
    const option = (value, label) => h('option', { value }, label);
    const stageSelect = h('select', { 'aria-label': 'stage', id: 'agents-stage' }, option('', 'every stage'),
      [...STAGES, ...OFF_ROAD].map(([s, label]) => option(s, `${label} (${record[s]})`)));
    stageSelect.value = pick.stage;
    stageSelect.addEventListener('change', () => show(stageSelect.value, pick.wave));
    const waveSelect = h('select', { 'aria-label': 'wave', id: 'agents-wave' }, option('', 'every wave'),
      record.waves.map((w) => option(String(w.index), `wave ${w.index + 1} (${w.size})`)));
    waveSelect.value = pick.wave;
    waveSelect.addEventListener('change', () => show(pick.stage, waveSelect.value));
    stages.replaceChildren(stageSelect, waveSelect);
  };
  const show = (stage, wave) => {
    Object.assign(pick, { stage, wave: wave === undefined ? '' : String(wave), offset: 0 });
    drawStages();
    loadAgents();
  };

  const load = guard(head, async () => {
    const r = await get(`/api/v1/rollouts/${enc(id)}`);
    const [all, builds] = await Promise.all([get(`/api/v1/rollouts?${query({ version: r.version })}`), get('/api/v1/releases')]);
    record = r;
    const facts = rolloutFacts(all, builds);
    document.title = `${r.kind} rollout of ${r.version} · Drover`;
    head.replaceChildren(
      h('h2', { id: 'rollout-title' }, `${r.version} · ${r.kind} rollout `, stateCell(r),
        facts.blocked.has(r.version) ? h('span', { class: 'marker blocked' }, 'blocked') : null),
      h('dl', { class: 'identity' },
        [['Rollout', h('span', { class: 'mono' }, r.id)], ['Platforms', platforms(r)],
          ['Started', [when(r.created_at), ` by ${r.started_by}`]],
          ['Plan', r.plan.waves.map((w) => `${w.share}${w.bake_seconds ? ` (bake ${duration(w.bake_seconds)})` : ''}`).join(' → ')],
          ['Halts at', `build failures over ${Math.round(r.plan.waves[0].max_failure_rate * 100)}% of at least `
            + `${plural(r.plan.waves[0].min_finished, 'finished update')}`
            + (r.plan.waves[0].max_failures !== null ? `, or over ${r.plan.waves[0].max_failures}` : '')],
          ['Progress', progress(r, facts)], ['Where they stand', h('div', { id: 'rollout-funnel' }, funnel(r, (s) => show(s, '')))],
          r.gate ? ['Promote gate', gateCell(r, facts)] : null,
        ].filter(Boolean).map(([k, v]) => [h('dt', {}, k), h('dd', {}, v)])),
      h('div', { class: 'actions' }, rolloutActions(r, facts)));
    waves.replaceChildren(...r.waves.map((w) => h('section', { class: `wave-card ${w.state}`, 'data-wave': w.index },
      h('h3', {}, `Wave ${w.index + 1} of ${r.waves.length} · up to ${w.share.endsWith('%') ? `${w.share} of the targets` : plural(Number(w.share), 'agent')} · ${plural(w.size, 'agent')} in it `,
        h('span', { class: `state ${w.state}`, 'data-wave-state': w.state }, w.state),
        w.counts.failures.build > 0 && w.state !== 'halted' && isOpen(r)
          ? h('span', { class: 'marker failing' }, `failing: ${plural(w.counts.failures.build, 'build failure')}`) : null),
      h('p', { class: 'wave-line' }, waveLine(r, w)),
      funnel(w.counts, (s) => show(s, w.index)))));
    timeline.replaceChildren(table(['When', 'What', 'Who', 'Detail'],
      r.timeline.map((e) => h('tr', { 'data-event': e.state },
        h('td', {}, when(e.at)), h('td', {}, state(e.state)), h('td', {}, e.actor), h('td', {}, e.detail || ''))),
      'Nothing yet.'));
    drawStages();
    if (timeBound(r)) again(view, load);
  });

  const loadAgents = guard(list, async () => {
    const page = await get(`/api/v1/rollouts/${enc(id)}/agents?${query({
      stage: pick.stage, wave: pick.wave, limit: PAGE, offset: pick.offset,
    })}`);
    list.replaceChildren(table(['Agent', 'Wave', 'Stage', 'Runs', 'Task', 'Error'],
      page.agents.map((a) => h('tr', { 'data-agent': a.agent_id, 'data-stage': a.stage },
        h('td', {}, h('a', { href: `#/agents/${enc(a.agent_id)}` }, a.hostname)), h('td', {}, a.wave + 1),
        h('td', {}, state(a.stage), a.failure_class ? h('span', { class: `failure-class ${a.failure_class}` }, a.failure_class) : null),
        h('td', {}, a.version), h('td', {}, a.status ? a.status.replace('_', ' ') : '—'), h('td', { class: 'error' }, a.error || ''))),
      pick.stage ? `No agent is ${pick.stage.replace('_', ' ')}.` : 'No agents.'));
    const first = page.total === 0 ? 0 : pick.offset + 1;
    const last = pick.offset + page.agents.length;
    const move = (by) => () => { pick.offset = Math.max(0, pick.offset + by); loadAgents(); };
    pager.replaceChildren(
      h('button', { type: 'button', disabled: pick.offset === 0, onclick: move(-PAGE) }, '‹ Previous'),
      h('span', { id: 'rollout-agents-total' }, `${first}–${last} of ${page.total}`),
      h('button', { type: 'button', disabled: last >= page.total, onclick: move(PAGE) }, 'Next ›'));
  });

  // A rollout note names a version (or none, when any may have changed): notes of other
  // versions are not this page's business.
  const concerns = (e) => (e.kind === 'task' && (!e.rollout || e.rollout === id))
    || e.kind === 'agent' || e.kind === 'release' || e.kind === 'settings'
    || (e.kind === 'rollout' && (!e.id || !record || e.id === record.version || e.id === id));
  const view = {
    title: 'Rollout',
    refresh(events) {
      if (events === null || events.some(concerns)) {
        load();
        loadAgents();
      }
    },
  };
  return view;
}

// ---------------------------------------------------------------- agents

const AGENT_FILTERS = ['q', 'site', 'channel', 'version', 'online', 'paused', 'sort'];

// The filters live in the address (#/agents?channel=beta&offset=50), so a filtered view
// can be linked to and survives a reload.
function agents(main, _arg, params) {
  const filters = { offset: Number(params.get('offset')) || 0 };
  for (const name of AGENT_FILTERS) filters[name] = params.get(name) || '';
  const body = h('div');
  const pager = h('div', { class: 'pager' });
  const remember = () => {
    const shown = query({ ...filters, offset: filters.offset || '' });
    history.replaceState(null, '', `#/agents${shown ? `?${shown}` : ''}`);
  };
  const field = (name, control) => {
    control.value = filters[name];
    control.addEventListener(control.tagName === 'SELECT' ? 'change' : 'input', () => {
      filters[name] = control.value;
      filters.offset = 0;
      remember();
      clearTimeout(field.timer);
      field.timer = setTimeout(load, 250);
    });
    return control;
  };
  const choice = (name, options) => field(name, h('select', { 'aria-label': name, 'data-filter': name },
    options.map(([value, label]) => h('option', { value }, label))));
  const siteSelect = choice('site', [['', 'any site']]);
  main.append(h('h2', {}, 'Agents'), h('div', { class: 'filters' },
    field('q', h('input', { id: 'agent-search', type: 'search', placeholder: 'hostname or id', 'aria-label': 'hostname or id' })),
    siteSelect,
    choice('channel', [['', 'any channel'], ['stable', 'stable'], ['beta', 'beta']]),
    field('version', h('input', { placeholder: 'version', size: 10, 'aria-label': 'version', 'data-filter': 'version' })),
    choice('online', [['', 'online or not'], ['true', 'online'], ['false', 'offline']]),
    choice('paused', [['', 'paused or not'], ['true', 'paused'], ['false', 'not paused']])),
  body, pager);

  // Sorting by a column: a second click reverses it.
  const sortable = (key, label) => {
    const now = filters.sort || 'hostname';
    const mark = now === key ? ' ▲' : (now === `-${key}` ? ' ▼' : '');
    return h('button', {
      type: 'button', class: 'sort', 'data-sort': key, 'data-label': label,
      onclick: () => {
        filters.sort = now === key ? `-${key}` : (key === 'hostname' ? '' : key);
        filters.offset = 0;
        remember();
        load();
      },
    }, label + mark);
  };
  const selected = new Set();
  const bulk = h('div', { class: 'actions', id: 'bulk' });
  if (canAct()) main.insertBefore(bulk, body);
  const drawBulk = (builds) => {
    if (!canAct()) return;
    const versions = [...new Set(builds.filter((b) => !b.blocked).map((b) => b.version))].sort(semverCompare).reverse();
    const picker = h('select', { 'aria-label': 'version for the selected agents', id: 'bulk-version' },
      versions.map((v) => h('option', { value: v }, v)));
    const ids = [...selected];
    const none = ids.length === 0;
    const each = (verb, path) => act(`${verb} automatic updates of ${plural(ids.length, 'selected agent')}.`, verb,
      async () => {
        for (const id of ids) await api('POST', `/api/v1/agents/${enc(id)}/${path}`);
        selected.clear();
      }, `${plural(ids.length, 'agent')}: ${verb.toLowerCase()}d`);
    bulk.replaceChildren(h('span', { id: 'bulk-count' }, `${plural(ids.length, 'agent')} selected`),
      h('button', { type: 'button', class: 'action', 'data-action': 'pause-selected', disabled: none, onclick: () => each('Pause', 'pause') }, 'Pause'),
      h('button', { type: 'button', class: 'action', 'data-action': 'resume-selected', disabled: none, onclick: () => each('Resume', 'resume') }, 'Resume'),
      picker,
      h('button', {
        type: 'button', class: 'action', 'data-action': 'update-selected', disabled: none || versions.length === 0,
        onclick: () => act(`Update ${plural(ids.length, 'selected agent')} to ${picker.value} in a targeted rollout, `
          + 'offered to them whatever their channel. Those already on it or newer, or with no build for their '
          + 'platform, are left out.', 'Update',
        async () => {
          await api('POST', '/api/v1/rollouts', { version: picker.value, selector: { agent_ids: ids } });
          selected.clear();
        },
        `targeted rollout of ${picker.value} started`),
      }, 'Update selected'));
  };
  const load = guard(body, async () => {
    const [dir, page, builds] = await Promise.all([names(), get(`/api/v1/agents?${query({ ...filters, limit: PAGE })}`),
      get('/api/v1/releases')]);
    if (siteSelect.options.length === 1) {
      for (const site of dir.sites.values()) siteSelect.append(h('option', { value: site.id }, site.name));
      siteSelect.value = filters.site;
    }
    for (const id of [...selected]) if (!page.agents.some((a) => a.id === id)) selected.delete(id);
    const tick = (a) => {
      const box = h('input', { type: 'checkbox', 'aria-label': `select ${a.hostname}`, 'data-select': a.id, checked: selected.has(a.id) });
      box.addEventListener('change', () => {
        if (box.checked) selected.add(a.id);
        else selected.delete(a.id);
        drawBulk(builds);
      });
      return box;
    };
    const all = h('input', { type: 'checkbox', 'aria-label': 'select every agent on this page', 'data-select': 'page' });
    all.addEventListener('change', () => {
      for (const a of page.agents) {
        if (all.checked) selected.add(a.id);
        else selected.delete(a.id);
      }
      for (const box of body.querySelectorAll('input[data-select]:not([data-select=page])')) box.checked = all.checked;
      drawBulk(builds);
    });
    drawBulk(builds);
    body.replaceChildren(table(
      [canAct() ? all : '', '', sortable('hostname', 'Hostname'), sortable('version', 'Version'), 'Update',
        sortable('platform', 'Platform'), sortable('site', 'Site'), 'Channel', sortable('last_seen', 'Last seen')],
      page.agents.map((a) => h('tr', { 'data-agent': a.id },
        h('td', { 'data-label': '' }, canAct() ? tick(a) : null),
        h('td', {}, h('span', { class: a.online ? 'dot on' : 'dot', role: 'img', 'aria-label': a.online ? 'online' : 'offline', title: a.online ? 'online' : 'offline' })),
        h('td', {}, h('a', { href: `#/agents/${enc(a.id)}` }, a.hostname),
          a.paused ? h('span', { class: 'marker paused' }, 'paused') : null,
          a.fingerprint_conflict ? h('span', { class: 'marker conflict', title: 'another machine with this fingerprint tried to enroll' }, 'fingerprint conflict') : null),
        h('td', {}, a.version),
        h('td', { class: 'task' }, a.pending_update ? h('span', { class: 'marker pending' }, `updating to ${a.pending_update}`) : '—'),
        h('td', {}, platform(a)), h('td', { class: 'site' }, siteName(dir, a.site_id)),
        h('td', {}, a.channel, ' ', h('small', { class: 'muted' }, `(${a.channel_source})`)),
        h('td', {}, when(a.last_seen)))),
      'No agent matches.'));
    const first = page.total === 0 ? 0 : filters.offset + 1;
    const last = filters.offset + page.agents.length;
    const move = (by) => () => { filters.offset = Math.max(0, filters.offset + by); remember(); load(); };
    pager.replaceChildren(
      h('button', { type: 'button', disabled: filters.offset === 0, onclick: move(-PAGE) }, '‹ Previous'),
      h('span', { id: 'agent-total' }, `${first}–${last} of ${page.total}`),
      h('button', { type: 'button', disabled: last >= page.total, onclick: move(PAGE) }, 'Next ›'));
  });
  return {
    title: 'Agents',
    refresh(events) { if (touches(events, 'agent', 'task', 'rollout', 'settings')) load(); },
  };
}

// ---------------------------------------------------------------- one agent

function agentDetail(main, id) {
  const body = h('div');
  main.append(h('p', {}, h('a', { href: '#/agents' }, '‹ Agents')), body);
  const load = guard(body, async () => {
    const [a, why, dir, builds, updates] = await Promise.all([get(`/api/v1/agents/${enc(id)}`),
      get(`/api/v1/agents/${enc(id)}/explain`), names(), get('/api/v1/releases'), get('/api/v1/updates')]);
    hostnames.set(a.id, a.hostname);
    document.title = `${a.hostname} · Drover`;
    const client = clientOf(dir, a.site_id);
    const facts = [
      ['Id', h('span', { class: 'mono' }, a.id)], ['Hostname', a.hostname], ['Version', a.version],
      ['Platform', platform(a)], ['Site', h('span', { 'data-site': a.site_id }, siteName(dir, a.site_id))],
      ['Client', client ? client.name : '—'],
      ['Channel', `${a.channel} (set at ${a.channel_source} level)`],
      ['Online', a.online ? 'yes' : 'no'], ['Last seen', when(a.last_seen)],
      ['Enrolled', when(a.enrolled_at)], ['Updates', a.paused ? 'paused' : (a.auto_update ? 'automatic' : 'off on the agent')],
      ['Pending update', a.pending_update || 'none'], ['Fingerprint', h('span', { class: 'mono' }, a.fingerprint)],
      ['Downloads', a.downloads && a.downloads.mirror
        ? h('span', { id: 'agent-mirror' }, 'from the mirror ', h('span', { class: 'mono' }, a.downloads.mirror),
          ` (set on its ${a.downloads.mirror_source === 'server' ? 'server' : a.downloads.mirror_source}), falling back to the server`)
        : h('span', { id: 'agent-mirror' }, 'from the server')],
    ];
    const conflict = a.fingerprint_conflict;
    body.replaceChildren(
      conflict ? h('p', { class: 'banner danger', id: 'fingerprint-conflict' },
        `Fingerprint conflict: ${conflict.attempts} enrollment${conflict.attempts === 1 ? '' : 's'} from another machine with this agent's fingerprint`
        + `${conflict.hostname ? ` (${conflict.hostname})` : ''} refused, the last `, when(conflict.last_at),
        '. This agent keeps its identity; a cloned machine needs its own machine id.') : '',
      h('h2', {}, a.hostname, a.paused ? h('span', { class: 'marker paused' }, 'paused') : null),
      h('dl', { class: 'identity' }, facts.map(([k, v]) => [h('dt', {}, k), h('dd', {}, v)])),
      canAct() ? agentActions(a, builds, updates) : '',
      explanation(why),
      h('h2', {}, 'Update tasks'),
      h('div', { id: 'tasks' }, table(['Created', 'Updated', 'Update', 'Kind', 'Rollout', 'Status', 'Attempts', 'Progress', 'Error'],
        a.tasks.map((t) => h('tr', {},
          h('td', {}, when(t.created_at)), h('td', {}, when(t.updated_at)),
          h('td', {}, `${t.from_version} → ${t.to_version}`), h('td', {}, t.kind),
          h('td', {}, t.rollout_id ? h('a', { href: `#/rollouts/${enc(t.rollout_id)}` },
            `${shortId(t.rollout_id)}${t.wave !== null ? `, wave ${t.wave + 1}` : ''}`) : '—'),
          h('td', {}, state(t.status), t.failure_class
            ? h('span', { class: `failure-class ${t.failure_class}`, title: 'failure class' }, t.failure_class) : null),
          h('td', {}, t.attempts), h('td', {}, t.bytes_total ? `${Math.round((100 * t.bytes_done) / t.bytes_total)}%` : '',
            transferNote(t)),
          h('td', { class: 'error' }, t.error || ''))),
        'No update tasks yet.')));
  });
  return {
    title: 'Agent',
    refresh(events) {
      const concerns = (e) => (e.kind === 'agent' && e.id === id) || (e.kind === 'task' && e.agent === id)
        || e.kind === 'release' || e.kind === 'rollout' || e.kind === 'settings';
      if (events === null || events.some(concerns)) load();
    },
  };
}

// The explain answer as the API gives it: the channel trace, the decision, what happens
// next, and every candidate build with why it is or is not offered.
function explanation(why) {
  return h('section', { id: 'explain' },
    h('h2', {}, 'Why it is or is not updating'),
    h('p', { class: 'trace', 'data-channel': why.channel }, 'Channel: ',
      why.channel_trace.map((step, i) => [i ? ' → ' : '', h('span', {
        class: step.level === why.channel_source ? 'decides' : 'muted',
      }, `${step.level} ${step.channel || '(not set)'}`)]),
      ` = ${why.channel}`),
    h('p', { 'data-decision': why.decision }, h('strong', {}, why.decision === 'offer' ? `Offer ${why.offer}` : 'Hold'), `: ${why.reason}`),
    h('p', { class: 'next' }, `Next: ${why.next}`),
    table(['Build', 'Channel', 'Offered', 'Why not'], why.candidates.map((c) => h('tr', { 'data-candidate': c.version },
      h('td', {}, c.version), h('td', {}, state(c.channel)), h('td', {}, c.offered ? 'yes' : 'no'),
      h('td', {}, c.reason || ''))), 'No build is offered for its platform.'));
}

// Update now: only versions that would be an update are listed; otherwise the button is
// disabled and says why.
function agentActions(a, builds, updates) {
  const base = `/api/v1/agents/${enc(a.id)}`;
  const channel = h('select', { 'aria-label': 'channel' },
    [['', 'inherit from site'], ['stable', 'stable'], ['beta', 'beta']].map(([v, l]) => h('option', { value: v }, l)));
  channel.value = a.channel_source === 'agent' ? a.channel : '';
  const newer = builds.filter((b) => platform(b) === platform(a) && !b.blocked && semverCompare(b.version, a.version) > 0)
    .sort((x, y) => semverCompare(y.version, x.version));
  let why = null;
  if (!updates.enabled) why = 'Updates are off server-wide.';
  else if (a.paused) why = 'Updates are paused for this agent; resume it first.';
  else if (!a.auto_update) why = 'The agent runs with auto-update off and declines updates.';
  else if (newer.length === 0) why = `Nothing newer than ${a.version} is offered for ${platform(a)}.`;
  const picker = h('select', { 'aria-label': 'version to update to', id: 'update-version', disabled: why !== null },
    newer.map((b) => h('option', { value: b.version }, `${b.version} (${b.channel})`)));
  const updateNow = canAct() ? h('button', {
    class: 'action', type: 'button', 'data-action': 'update-now', disabled: why !== null, title: why,
    onclick: () => act(`Update ${a.hostname} now from ${a.version} to ${picker.value} (a targeted rollout of this one agent)`
      + `${a.pending_update ? `; its unfinished update to ${a.pending_update} is cancelled` : ''}.`, 'Update now',
    () => api('POST', `${base}/update`, { version: picker.value }), `update to ${picker.value} sent to ${a.hostname}`),
  }, 'Update now') : null;
  return h('div', { class: 'actions' },
    a.paused
      ? actionButton('Resume updates', () => act(`Resume automatic updates of ${a.hostname}.`, 'Resume',
        () => api('POST', `${base}/resume`), `${a.hostname} resumed`))
      : actionButton('Pause updates', () => act(`Pause automatic updates of ${a.hostname}: it stays on ${a.version} until resumed.`,
        'Pause', () => api('POST', `${base}/pause`), `${a.hostname} paused`)),
    newer.length ? picker : null, updateNow, why ? h('small', { class: 'muted', 'data-why': 'update-now' }, why) : null,
    channel,
    actionButton('Set channel', () => act(channel.value
      ? `Put ${a.hostname} on the ${channel.value} channel (now ${a.channel}, from its ${a.channel_source}).`
      : `Clear ${a.hostname}'s own channel: it follows its site (or client) again.`, 'Set channel',
    () => api('PUT', `${base}/channel`, { channel: channel.value || null }), `channel of ${a.hostname} set`)));
}

// ---------------------------------------------------------------- releases

// How a build crosses the wire: its compressed copy and deltas when ready, else as it is
// (and why, when making the copy failed).
function sentAs(r) {
  if (r.compressed_size != null) {
    const deltas = r.deltas.length
      ? `; deltas from ${r.deltas.map((d) => `${d.from_version} (${bytes(d.size)})`).join(', ')}` : '';
    return `compressed, ${bytes(r.compressed_size)}${deltas}`;
  }
  if (r.compressed_error) {
    return h('span', { class: 'warn', title: r.compressed_error }, `as it is: the compressed copy failed (${r.compressed_error})`);
  }
  return h('span', { class: 'muted' }, 'as it is');
}

function releases(main) {
  const body = h('div');
  main.append(body);
  const load = guard(body, async () => {
    const listing = await get('/api/v1/releases?include=skipped');
    body.replaceChildren(
      h('h2', {}, 'Offered builds'),
      table(['Version', 'Platform', 'Channel', 'Size', 'Sent as', 'Signed', 'SHA-256', 'File'],
        listing.releases.map((r) => h('tr', {},
          h('td', {}, h('a', { href: `#/rollouts?version=${enc(r.version)}` }, r.version),
            r.blocked ? h('span', { class: 'marker blocked' }, 'blocked') : null),
          h('td', {}, platform(r)), h('td', {}, state(r.channel)), h('td', {}, bytes(r.size)),
          h('td', { class: 'sent-as' }, sentAs(r)),
          h('td', {}, r.signed ? 'yes' : 'no'), h('td', { class: 'mono', title: r.sha256 }, r.sha256.slice(0, 12)),
          h('td', { class: 'mono' }, r.file))),
        'No build is offered.'),
      h('h2', {}, 'Skipped files'),
      table(['File', 'Why it is not offered'],
        listing.skipped.map((s) => h('tr', {}, h('td', { class: 'mono' }, s.file), h('td', {}, s.reason))),
        'Every file in the downloads directory is offered.'));
  });
  return { title: 'Releases', refresh(events) { if (touches(events, 'release', 'rollout')) load(); } };
}

// ---------------------------------------------------------------- audit

const AUDIT_ACTIONS = ['rollout.promote', 'rollout.rollback', 'rollout.unblock', 'rollout.create', 'rollout.pause',
  'rollout.resume', 'rollout.advance', 'rollout.abort', 'rollout.halt',
  'agent.pause', 'agent.resume', 'agent.update', 'agent.channel', 'agent.reenroll', 'site.channel', 'client.channel',
  'agent.fingerprint_conflict', 'releases.rescan', 'updates.switch', 'token.create', 'token.revoke',
  'enrollment_token.create', 'enrollment_token.revoke', 'client.create', 'site.create', 'session.login',
  'session.logout'];

const isVersion = (text) => /^\d+\.\d+\.\d+([-+].*)?$/.test(text);

// An entry's target by name, linked where the dashboard has a page for it.
function auditTarget(e, dir) {
  const [kind] = e.action.split('.');
  if (kind === 'agent') {
    return h('a', { href: `#/agents/${enc(e.target)}`, 'data-target': 'agent' }, hostnames.get(e.target) || e.target);
  }
  if (kind === 'rollout') {
    return isVersion(e.target)
      ? h('a', { href: `#/rollouts?version=${enc(e.target)}`, 'data-target': 'version' }, e.target)
      : h('a', { href: `#/rollouts/${enc(e.target)}`, 'data-target': 'rollout' }, `rollout ${shortId(e.target)}`);
  }
  if (kind === 'site' && dir.sites.has(e.target)) return `site ${dir.sites.get(e.target).name}`;
  if (kind === 'client' && dir.clients.has(e.target)) return `client ${dir.clients.get(e.target).name}`;
  return e.target;
}

function audit(main) {
  const filter = h('select', { 'aria-label': 'action' }, h('option', { value: '' }, 'every action'),
    AUDIT_ACTIONS.map((a) => h('option', { value: a }, a)));
  const body = h('div');
  const more = h('div', { class: 'pager' });
  filter.addEventListener('change', () => load());
  main.append(h('h2', {}, 'Audit log'), h('div', { class: 'filters' }, filter), body, more);
  // Hostnames of the agents the entries name, each asked once.
  const learn = async (entries) => {
    const unknown = [...new Set(entries.filter((e) => e.action.startsWith('agent.') && !hostnames.has(e.target)).map((e) => e.target))];
    await Promise.all(unknown.map((id) => get(`/api/v1/agents/${enc(id)}`)
      .then((a) => hostnames.set(id, a.hostname)).catch(() => hostnames.set(id, id))));
  };
  const rows = (entries, dir) => entries.map((e) => h('tr', { 'data-action': e.action },
    h('td', {}, when(e.at)), h('td', {}, e.actor), h('td', { class: 'mono' }, e.action),
    h('td', {}, auditTarget(e, dir)), h('td', {}, e.result), h('td', {}, e.detail || '')));
  const fetchPage = (before) => get(`/api/v1/audit?${query({ limit: 100, action: filter.value, before })}`);
  const showMore = (next) => more.replaceChildren(next === null ? '' : h('button', {
    type: 'button',
    onclick: async () => {
      const [page, dir] = await Promise.all([fetchPage(next), names()]);
      await learn(page.entries);
      body.querySelector('tbody').append(...rows(page.entries, dir));
      showMore(page.next_before);
    },
  }, 'Older entries'));
  const load = guard(body, async () => {
    const [page, dir] = await Promise.all([fetchPage(null), names()]);
    await learn(page.entries);
    body.replaceChildren(table(['When', 'Who', 'Action', 'Target', 'Result', 'Detail'], rows(page.entries, dir),
      'No entries.'));
    showMore(page.next_before);
  });
  return { title: 'Audit', refresh(events) { if (touches(events, 'audit')) load(); } };
}

// ---------------------------------------------------------------- enrollment tokens

const TOKEN_STATES = { usable: 'usable', expired: 'expired', used_up: 'used up', revoked: 'revoked' };

// Every enrollment token with its site, limits and state; admins revoke them here.
function enrollment(main) {
  const body = h('div');
  main.append(h('h2', {}, 'Enrollment tokens'),
    h('p', { class: 'muted' }, 'A token enrolls machines into its site until it expires, is used up or is revoked; '
      + 'enrolled agents keep their identities when it goes. Make one with drover sites enroll-token SITE.'),
    body);
  const revoke = (t, site) => (me.role === 'admin' && t.state !== 'revoked'
    ? h('button', {
      class: 'action danger', type: 'button', 'data-action': 'revoke',
      onclick: () => act(`Revoke enrollment token ${shortId(t.id)} of site ${site}: no machine can enroll with it any more `
        + `(${t.uses} enrolled with it keep their identities).`, 'Revoke',
      () => api('DELETE', `/api/v1/enrollment-tokens/${enc(t.id)}`), `enrollment token ${shortId(t.id)} revoked`,
      { danger: true }),
    }, 'Revoke')
    : null);
  const load = guard(body, async () => {
    if (me.role !== 'admin') {
      body.replaceChildren(h('p', {}, 'Enrollment tokens are shown to admins only.'));
      return;
    }
    const [tokens, dir] = await Promise.all([get('/api/v1/enrollment-tokens'), names()]);
    body.replaceChildren(table(['Token', 'Site', 'Created', 'Expires', 'Uses', 'State', ''],
      tokens.map((t) => h('tr', { 'data-token': t.id, 'data-state': t.state },
        h('td', { class: 'mono', title: t.id }, shortId(t.id)), h('td', {}, siteName(dir, t.site_id)),
        h('td', {}, when(t.created_at)), h('td', {}, t.expires_at ? when(t.expires_at) : 'never'),
        h('td', {}, t.max_uses === null ? `${t.uses}` : `${t.uses} of ${t.max_uses}`),
        h('td', {}, TOKEN_STATES[t.state] || t.state),
        h('td', {}, revoke(t, siteName(dir, t.site_id))))),
      'No enrollment token.'));
  });
  return { title: 'Enrollment', refresh(events) { if (touches(events, 'audit', 'settings')) load(); } };
}

// ---------------------------------------------------------------- sites

// A maintenance window as one line: its schedule, and whether it is open now.
function windowText(w) {
  if (!w) return '—';
  return [`${w.days.join(',')} ${w.start} for ${w.duration} ${w.time_zone} (${w.open ? 'open' : 'closed'} until `,
    when(w.until), ')'];
}

// Clients and sites with their channel, window and download mirror; operators set and
// clear mirrors here. What a site without its own mirror uses is said, not left blank.
function sites(main) {
  const body = h('div');
  main.append(h('h2', {}, 'Sites and clients'),
    h('p', { class: 'muted' }, "A site's agents download updates from its mirror, else its client's, else the server-wide "
      + 'mirror (--download-url), else from this server. They verify what a mirror serves and fall back to this server '
      + 'when it fails.'),
    body);
  const setMirror = (kind, item) => actionButton('Set mirror', () => act(
    `Send the agents of ${kind} ${item.name} to a download mirror: a web server holding copies of the offered builds `
    + '(drover mirror sync fills one). They verify its bytes and fall back to this server when it fails.',
    'Set mirror',
    (values) => api('PUT', `/api/v1/${kind}s/${enc(item.id)}/download-mirror`, { url: values.url }),
    `${kind} ${item.name}: download mirror set`,
    { fields: [{ name: 'url', label: 'Mirror base URL', hint: 'https://mirror.example.com/drover' }] },
  ));
  const clearMirror = (kind, item) => (item.download_mirror ? actionButton('Clear mirror', () => act(
    `Stop sending the agents of ${kind} ${item.name} to ${item.download_mirror}: they follow `
    + `${kind === 'site' ? "their client's mirror, the server-wide one" : 'the server-wide mirror'} or this server.`,
    'Clear mirror',
    () => api('PUT', `/api/v1/${kind}s/${enc(item.id)}/download-mirror`, { url: null }),
    `${kind} ${item.name}: download mirror cleared`,
  )) : null);
  const load = guard(body, async () => {
    const [siteList, clientList, mirrors] = await Promise.all([get('/api/v1/sites'), get('/api/v1/clients'),
      get('/api/v1/mirrors')]);
    const health = new Map(mirrors.mirrors.map((m) => [m.url, m]));
    const clients = new Map(clientList.map((c) => [c.id, c]));
    const fallback = mirrors.download_url ? `the server-wide mirror ${mirrors.download_url}` : 'this server';
    const mirrorCell = (own, inherited) => (own
      ? [h('span', { class: 'mono' }, own),
        (health.get(own) || {}).failing ? h('span', { class: 'marker failing' }, 'failing') : null]
      : h('span', { class: 'muted' }, `none: ${inherited}`));
    const ofClient = (c) => (c && c.download_mirror ? `its client's, ${c.download_mirror}` : fallback);
    body.replaceChildren(
      h('p', { id: 'server-mirror' }, 'Server-wide mirror: ', mirrors.download_url
        ? h('span', { class: 'mono' }, mirrors.download_url) : 'none'),
      h('h3', {}, 'Clients'),
      table(['Client', 'Channel', 'Maintenance window', 'Download mirror', ''],
        clientList.map((c) => h('tr', { 'data-client': c.id },
          h('td', {}, c.name), h('td', {}, c.channel || '—'), h('td', {}, windowText(c.maintenance_window)),
          h('td', { class: 'mirror' }, mirrorCell(c.download_mirror, fallback)),
          h('td', { class: 'actions-cell' }, setMirror('client', c), clearMirror('client', c)))),
        'No clients.'),
      h('h3', {}, 'Sites'),
      table(['Site', 'Client', 'Channel', 'Maintenance window', 'Download mirror', ''],
        siteList.map((s) => h('tr', { 'data-site': s.id },
          h('td', {}, s.name), h('td', {}, (clients.get(s.client_id) || { name: s.client_id }).name),
          h('td', {}, s.channel || '—'), h('td', {}, windowText(s.maintenance_window)),
          h('td', { class: 'mirror' }, mirrorCell(s.download_mirror, ofClient(clients.get(s.client_id)))),
          h('td', { class: 'actions-cell' }, setMirror('site', s), clearMirror('site', s)))),
        'No sites.'));
  });
  return { title: 'Sites', refresh(events) { if (touches(events, 'settings', 'task')) load(); } };
}

// ---------------------------------------------------------------- routing

const VIEWS = { overview, rollouts, agents, releases, sites, enrollment, audit };

function route() {
  if (me === null) return;
  const [path, search] = location.hash.replace(/^#\/?/, '').split('?');
  const [name, arg] = path.split('/');
  const params = new URLSearchParams(search || '');
  let view = VIEWS[name];
  if (arg && name === 'agents') view = agentDetail;
  if (arg && name === 'rollouts') view = rolloutPage;
  if (!view) {
    location.hash = '#/overview';
    return;
  }
  for (const link of document.querySelectorAll('nav a')) {
    const here = link.dataset.view === name;
    link.classList.toggle('active', here);
    if (here) link.setAttribute('aria-current', 'page');
    else link.removeAttribute('aria-current');
  }
  const main = $('main');
  main.replaceChildren();
  current = view(main, arg ? decodeURIComponent(arg) : undefined, params);
  document.title = `${current.title} · Drover`;
  current.refresh(null);
}

// Some of what a rollout shows changes with time alone, with no event to tell of it: a
// success settling through the success bake (and so the gate), a bake ending. While
// any is on screen, the view is read again every few seconds.
const timeBound = (r) => (r.gate && !r.gate.pass && r.succeeded > 0) || r.waves.some((w) => w.state === 'baking');
function again(view, load) {
  clearTimeout(again.timer);
  again.timer = setTimeout(() => { if (current === view) load(); }, 3000);
}

// Whether any of the events (null: a full load) is of one of the kinds.
const touches = (events, ...kinds) => events === null || events.some((e) => kinds.includes(e.kind));

// What a batch of events asks of rollouts on screen: null to read the list again whole,
// else the ids of the rollouts to read again one by one. A task note names its rollout;
// any other note that may change a rollout's counts (an agent, a rollout, a build or a
// setting changed) does not say which.
function rolloutsNamed(events) {
  if (events === null) return null;
  const ids = new Set();
  for (const e of events) {
    if (e.kind === 'task' && e.rollout) ids.add(e.rollout);
    else if (['agent', 'task', 'rollout', 'release', 'settings'].includes(e.kind)) return null;
  }
  return ids;
}

// Reads the rollouts of `list` named in `ids` again, in place; a rollout not in the list
// (on another page) is not this list's business.
async function reread(list, ids) {
  const wanted = [...ids].filter((id) => list.some((r) => r.id === id));
  const fresh = await Promise.all(wanted.map((id) => get(`/api/v1/rollouts/${enc(id)}`)));
  for (const r of fresh) list[list.findIndex((x) => x.id === r.id)] = r;
}

// ---------------------------------------------------------------- live updates

let source = null;
let queued = [];
let flush = null;

function liveIndicator(on, title) {
  $('live').classList.toggle('on', on);
  $('live').title = title;
  $('live').textContent = on ? 'live' : 'not live';
}

let flushed = 0;

// Events arriving together are handled together, once, after a short pause: a burst of
// agents reconnecting costs one re-fetch, not one per agent. While events stream in
// (a large rollout), the view is re-read at most once a second.
function onEvent(event) {
  if (event.kind === 'settings') directory = null;
  queued.push(event);
  if (flush) return;
  const wait = Math.max(200, 1000 - (Date.now() - flushed));
  flush = setTimeout(() => {
    const events = queued;
    queued = [];
    flush = null;
    flushed = Date.now();
    // A resync means notes were missed: everything on screen is re-read.
    if (current) current.refresh(events.some((e) => e.kind === 'resync') ? null : events);
  }, wait);
}

function listen() {
  if (source) return;
  let opened = false;
  source = new EventSource('/api/v1/events');
  source.onopen = () => {
    liveIndicator(true, 'Live updates: on');
    // Whatever happened while disconnected (a server restart) was not heard: load all.
    if (opened && current) current.refresh(null);
    opened = true;
  };
  source.onmessage = (message) => onEvent(JSON.parse(message.data));
  source.onerror = () => {
    liveIndicator(false, 'Live updates: reconnecting');
    // The browser retries by itself unless the server refused the stream (a 401).
    if (source.readyState === EventSource.CLOSED) {
      stopListening();
      const again = () => checkSession().catch(() => setTimeout(again, 5000));
      setTimeout(again, 3000);
    }
  };
}

function stopListening() {
  if (source) source.close();
  source = null;
  liveIndicator(false, 'Live updates: off');
}

// ---------------------------------------------------------------- login

function showLogin(message) {
  me = null;
  current = null;
  directory = null;
  stopListening();
  document.title = 'Log in · Drover';
  $('top').hidden = true;
  $('main').replaceChildren();
  $('login').hidden = false;
  $('login-error').textContent = message || '';
  $('token').focus();
}

function showApp() {
  $('login').hidden = true;
  $('top').hidden = false;
  $('who').textContent = `${me.name} (${me.role})`;
  listen();
  if (!location.hash || location.hash === '#') location.hash = '#/overview';
  else route();
}

async function checkSession() {
  const response = await fetch('/api/v1/session', { credentials: 'same-origin' });
  if (response.status === 401) return showLogin();
  if (!response.ok) throw new Error(`${response.status}`);
  me = await response.json();
  showApp();
}

async function login(event) {
  event.preventDefault();
  const response = await fetch('/api/v1/session', {
    method: 'POST', credentials: 'same-origin',
    headers: { 'Content-Type': 'application/json', 'X-Drover': '1' },
    body: JSON.stringify({ token: $('token').value }),
  });
  const data = await response.json().catch(() => null);
  if (!response.ok) {
    $('login-error').textContent = (data && data.detail) || `login failed (${response.status})`;
    return;
  }
  $('token').value = '';
  me = data;
  showApp();
}

async function logout() {
  await fetch('/api/v1/session', { method: 'DELETE', credentials: 'same-origin', headers: { 'X-Drover': '1' } });
  showLogin('Logged out.');
}

document.addEventListener('DOMContentLoaded', () => {
  $('login-form').addEventListener('submit', login);
  $('logout').addEventListener('click', logout);
  window.addEventListener('hashchange', route);
  // Other nodes' changes have no event; a slow full refresh covers them. Relative times
  // tick every second.
  setInterval(() => { if (current && !document.hidden) current.refresh(null); }, 30000);
  setInterval(tickClocks, 1000);
  checkSession().catch((err) => showLogin(`The server did not answer: ${err.message}`));
});
