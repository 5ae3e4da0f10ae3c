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

function table(headings, rows, empty) {
  if (rows.length === 0) return h('p', { class: 'muted' }, empty || 'Nothing here.');
  return h('table', {},
    h('thead', {}, h('tr', {}, headings.map((t) => h('th', {}, t)))),
    h('tbody', {}, rows));
}

const state = (name) => h('span', { class: `state ${name}` }, name.replace('_', ' '));
const plural = (n, word) => `${n} ${word}${n === 1 ? '' : 's'}`;
const are = (n) => (n === 1 ? 'is' : 'are');
const platform = (x) => `${x.os}/${x.arch}`;
const enc = encodeURIComponent;
const query = (params) => new URLSearchParams(
  Object.entries(params).filter(([, v]) => v !== '' && v !== null && v !== undefined)).toString();

function ago(rfc3339) {
  if (!rfc3339) return '';
  const seconds = Math.max(0, (Date.now() - Date.parse(rfc3339)) / 1000);
  return `${duration(seconds)} ago`;
}

function duration(seconds) {
  if (seconds < 60) return `${Math.round(seconds)}s`;
  if (seconds < 3600) return `${Math.round(seconds / 60)}m`;
  if (seconds < 86400) return `${Math.round(seconds / 3600)}h`;
  return `${Math.round(seconds / 86400)}d`;
}

function bytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1048576) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / 1048576).toFixed(1)} MiB`;
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

function toast(message, isError) {
  const el = $('toast');
  el.textContent = message;
  el.className = isError ? 'error' : '';
  el.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { el.hidden = true; }, isError ? 8000 : 4000);
}

// Resolves true when the operator confirms. The text says what will happen, with numbers.
function confirmAction(text, label) {
  const dialog = $('confirm');
  $('confirm-text').textContent = text;
  $('confirm-ok').textContent = label;
  dialog.showModal();
  return new Promise((resolve) => {
    const done = (answer) => () => {
      $('confirm-ok').onclick = null;
      $('confirm-cancel').onclick = null;
      dialog.onclose = null;
      if (dialog.open) dialog.close();
      resolve(answer);
    };
    $('confirm-ok').onclick = done(true);
    $('confirm-cancel').onclick = done(false);
    dialog.onclose = done(false);
  });
}

// Runs an action after confirmation, reports it, and shows the view afresh.
async function act(text, label, run, success) {
  if (!(await confirmAction(text, label))) return;
  try {
    await run();
    toast(success);
  } catch (err) {
    toast(err.message, true);
  }
  if (current) current.refresh(null);
}

// `data-action` names the button for tests and styles: "Roll back" is `roll-back`.
const actionButton = (label, onclick) => (canAct()
  ? h('button', { class: 'action', type: 'button', 'data-action': label.toLowerCase().replace(/ /g, '-'), onclick }, label)
  : null);

// Handles a view's loader failing: the message goes where the data would have been.
function guard(target, load) {
  return () => load().catch((err) => {
    if (err.message !== 'not logged in') target.replaceChildren(h('p', { class: 'error' }, err.message));
  });
}

// ---------------------------------------------------------------- overview

function overview(main) {
  const banners = h('div', { id: 'banners' });
  const counts = h('div', { class: 'cards' });
  const charts = h('div', { class: 'charts' });
  const active = h('div');
  const adoption = h('div', { class: 'charts', id: 'adoption' });
  main.append(banners, h('h2', {}, 'Agents'), counts, h('h2', {}, 'Versions in the fleet'), charts,
    h('h2', {}, 'Version adoption over time'), adoption, h('h2', {}, 'Active rollouts'), active);

  const loadFleet = guard(counts, async () => {
    const fleet = await get('/api/v1/fleet');
    counts.replaceChildren(
      card('online', fleet.online, 'ok'), card('offline', fleet.offline, fleet.offline ? 'warn' : ''),
      card('total', fleet.total), card('paused', fleet.paused));
    charts.replaceChildren(...versionCharts(fleet.versions));
  });
  const loadAdoption = guard(adoption, async () => {
    adoption.replaceChildren(...adoptionCharts(await get('/api/v1/fleet/history?hours=168')));
  });
  const loadRollouts = guard(active, async () => {
    const rollouts = await get('/api/v1/rollouts');
    banners.replaceChildren(...rolloutBanners(rollouts));
    active.replaceChildren(table(['Version', 'Kind', 'State', 'Wave', 'Progress', 'Build failures'],
      rollouts.filter(isOpen).map((r) => h('tr', { 'data-rollout': r.id, 'data-version': r.version, 'data-kind': r.kind },
        h('td', {}, r.version), h('td', {}, r.kind), h('td', {}, state(r.state)), h('td', { class: 'wave' }, waveText(r)),
        h('td', {}, progress(r)),
        h('td', { class: r.failures.build ? 'failures bad' : 'failures' }, r.failures.build))),
      'No active rollouts.'));
  });
  return {
    refresh(events) {
      if (touches(events, 'agent', 'task', 'settings')) loadFleet();
      // Snapshots are taken every few minutes; the 30 s refresh is soon enough.
      if (events === null) loadAdoption();
      if (touches(events, 'agent', 'task', 'rollout', 'release', 'settings')) loadRollouts();
    },
  };
}

function card(name, value, tone) {
  return h('div', { class: `card ${tone || ''}`, 'data-count': name },
    h('span', { class: 'value' }, value), h('span', { class: 'muted' }, name));
}

// One horizontal bar chart per platform: agents per version.
function versionCharts(versions) {
  const platforms = new Map();
  for (const v of versions) {
    const key = platform(v);
    if (!platforms.has(key)) platforms.set(key, []);
    platforms.get(key).push(v);
  }
  if (platforms.size === 0) return [h('p', { class: 'muted' }, 'No agents yet.')];
  return [...platforms].map(([name, rows]) => {
    const most = Math.max(...rows.map((r) => r.agents));
    const height = 24;
    return h('div', { class: 'chart', 'data-platform': name }, h('h3', {}, name),
      svg('svg', { viewBox: `0 0 500 ${rows.length * height}`, role: 'img', 'aria-label': `versions on ${name}` },
        rows.map((r, i) => svg('g', { transform: `translate(0 ${i * height})` },
          svg('text', { x: 0, y: 16 }, r.version),
          svg('rect', { x: 110, y: 4, height: 16, width: Math.max(2, (r.agents / most) * 250) }),
          svg('text', { x: 116 + Math.max(2, (r.agents / most) * 250), y: 16 },
            `${r.agents} (${r.online} online)`)))));
  });
}

// One stacked-area-like line chart per platform: agents per version at each snapshot.
function adoptionCharts(points) {
  const platforms = new Map();
  for (const p of points) {
    const key = platform(p);
    if (!platforms.has(key)) platforms.set(key, { times: [], versions: new Map() });
    const chart = platforms.get(key);
    if (!chart.times.includes(p.at)) chart.times.push(p.at);
    if (!chart.versions.has(p.version)) chart.versions.set(p.version, new Map());
    chart.versions.get(p.version).set(p.at, p.agents);
  }
  if (platforms.size === 0) return [h('p', { class: 'muted' }, 'No snapshots yet; they are taken every few minutes.')];
  const width = 500, height = 120;
  return [...platforms].map(([name, { times, versions }]) => {
    const most = Math.max(1, ...points.filter((p) => platform(p) === name).map((p) => p.agents));
    const x = (i) => (times.length < 2 ? width / 2 : (i / (times.length - 1)) * (width - 100));
    const y = (n) => height - 10 - (n / most) * (height - 20);
    const lines = [...versions].map(([version, counts], k) => svg('g', { class: `series s${k % 6}` },
      svg('polyline', { fill: 'none', points: times.map((t, i) => `${x(i)},${y(counts.get(t) || 0)}`).join(' ') }),
      svg('text', { x: width - 95, y: 14 + k * 14 }, version)));
    return h('div', { class: 'chart', 'data-adoption': name }, h('h3', {}, name),
      svg('svg', { viewBox: `0 0 ${width} ${height}`, role: 'img', 'aria-label': `version adoption on ${name}` }, lines));
  });
}

// A rollout is open while it can still start agents or be resumed.
const OPEN = ['running', 'waiting', 'paused', 'halted'];
const isOpen = (r) => OPEN.includes(r.state);
const platforms = (r) => (r.platforms.length ? r.platforms.map(platform).join(', ') : '–');
const waveText = (r) => (r.waves.length ? `${r.current_wave + 1} of ${r.waves.length}` : '–');
// Random ids are long; their first characters tell rollouts apart on screen. The ids of
// rollouts started by a build landing name their kind, version and platform already.
const randomId = (id) => /^[0-9a-f]{8}-[0-9a-f]{4}-/.test(id);
const shortId = (id) => (randomId(id) ? id.slice(0, 8) : id);
const named = (r) => (randomId(r.id) ? `${r.kind} rollout ${shortId(r.id)} of ${r.version}` : `rollout ${r.id}`);
const unfinished = (r) => r.queued + r.in_progress;
const failedTotal = (r) => r.failed + r.rolled_back;

// Succeeded of targeted. The bar is full only when every target succeeded.
function progress(r) {
  const share = r.targeted ? r.succeeded / r.targeted : 0;
  const width = r.succeeded < r.targeted ? Math.min(99, Math.floor(share * 100)) : (r.targeted ? 100 : 0);
  const bar = h('span');
  bar.style.width = `${width}%`;
  return h('div', { class: 'progress-cell', title: `${r.succeeded} of ${r.targeted} targeted agents succeeded` },
    h('div', { class: 'progress' }, bar), h('small', { class: 'muted' }, `${r.succeeded} / ${r.targeted}`));
}

function rolloutBanners(rollouts) {
  return [
    ...rollouts.filter((r) => r.state === 'halted').map((r) => h('div', { class: 'banner danger', 'data-banner': 'halted', 'data-rollout': r.id },
      h('span', {}, `The ${named(r)} (${platforms(r)}) is halted: ${r.reason || 'too many build failures'}. `
        + 'No agent is started on it until an operator resumes it.'),
      actionButton('Resume', () => resume(r)))),
    ...rollouts.filter((r) => r.kind === 'beta' && r.stale_stable).map((r) => h('div', { class: 'banner warn', 'data-banner': 'stale' },
      `Stable is stale on ${platforms(r)}: beta ${r.version} has been ahead of stable for `
      + `${duration(r.stable_lag_seconds || 0)}. Promote it or roll it back.`)),
  ];
}

// ---------------------------------------------------------------- rollouts

function rollouts(main) {
  const banners = h('div');
  const body = h('div');
  main.append(h('h2', {}, 'Rollouts'), banners, body);
  const load = guard(body, async () => {
    const [all, builds] = await Promise.all([get('/api/v1/rollouts'), get('/api/v1/releases')]);
    // A version is blocked as its builds say; one whose builds are gone from the
    // listing is taken as blocked while a rollback of it is open.
    const blocked = new Set(builds.filter((b) => b.blocked).map((b) => b.version));
    for (const r of all) {
      if (r.kind === 'rollback' && isOpen(r) && !builds.some((b) => b.version === r.version)) blocked.add(r.version);
    }
    const facts = { all, builds, blocked, unblockOn: new Set() };
    // Unblock goes on the newest row of a blocked version (the list is newest first).
    for (const version of blocked) {
      const newest = all.find((r) => r.version === version);
      if (newest) facts.unblockOn.add(newest.id);
    }
    banners.replaceChildren(...rolloutBanners(all));
    body.replaceChildren(table(
      ['Version', 'Kind', 'Platforms', 'State', 'Wave', 'Funnel', 'Gate', ''],
      all.map((r) => h('tr', { 'data-rollout': r.id, 'data-version': r.version, 'data-kind': r.kind },
        h('td', { title: `rollout ${r.id}` }, r.version,
          randomId(r.id) ? [' ', h('small', { class: 'muted mono' }, shortId(r.id))] : null,
          blocked.has(r.version) ? h('span', { class: 'marker paused' }, 'blocked') : null),
        h('td', { class: 'kind' }, r.kind), h('td', {}, platforms(r)),
        h('td', {}, state(r.state),
          r.reason && ['halted', 'aborted', 'superseded'].includes(r.state) ? h('small', { class: 'reason' }, r.reason) : null),
        h('td', { class: 'wave' }, waveText(r)),
        h('td', {}, funnel(r), progress(r)),
        h('td', { class: 'gate' }, r.gate
          ? [h('span', { class: r.gate.pass ? 'state succeeded' : 'state failed' }, r.gate.pass ? 'pass' : 'fail'),
            ' ', h('small', {}, r.gate.reason)]
          : '—'),
        h('td', {}, rolloutActions(r, facts)))),
      'No rollouts yet: a build published on beta, a promote or a rollback starts one.'));
  });
  return { refresh(events) { if (touches(events, 'agent', 'task', 'rollout', 'release', 'settings')) load(); } };
}

// Where the targets stand: the road to success, then the ways off it that happened.
function funnel(r) {
  const off = [[r.failed, 'failed'], [r.rolled_back, 'rolled back'], [r.cancelled, 'cancelled'], [r.skipped, 'skipped']]
    .filter(([n]) => n > 0).map(([n, what]) => `${n} ${what}`);
  return h('div', { class: 'funnel', title: `${r.targeted} targeted` },
    `${r.waiting} waiting → ${r.queued} queued → ${r.in_progress} in progress → ${r.succeeded} succeeded`,
    off.length ? h('span', { class: r.failed + r.rolled_back > 0 ? 'bad' : 'muted' }, ` · ${off.join(', ')}`) : null);
}

function rolloutActions(r, facts) {
  const running = r.state === 'running' || r.state === 'waiting';
  const promotable = r.kind === 'beta' && !facts.blocked.has(r.version)
    && facts.builds.some((b) => b.version === r.version && b.channel === 'beta');
  return [
    promotable ? actionButton('Promote', () => promote(r, facts.all)) : null,
    running ? actionButton('Pause', () => pause(r)) : null,
    r.state === 'paused' || r.state === 'halted' ? actionButton('Resume', () => resume(r)) : null,
    running && r.current_wave < r.waves.length - 1 ? actionButton('Advance', () => advance(r)) : null,
    isOpen(r) ? actionButton('Abort', () => abort(r)) : null,
    r.kind !== 'rollback' && !facts.blocked.has(r.version) ? actionButton('Roll back', () => rollback(r, facts.all)) : null,
    facts.unblockOn.has(r.id) ? actionButton('Unblock', () => unblock(r)) : null,
  ];
}

async function agentCount(filters) {
  return (await get(`/api/v1/agents?${query({ ...filters, limit: 0 })}`)).total;
}

// A promote flips the version's channel on every platform it has a build for; the gate
// shown is this beta rollout's.
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
  await act(text, force ? 'Promote anyway' : 'Promote',
    () => api('POST', `/api/v1/rollouts/${enc(r.version)}/promote`, { os: only.os, arch: only.arch, force }),
    `${r.version} is stable`);
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
  () => api('POST', `/api/v1/rollouts/${enc(r.id)}/abort`), `${named(r)} aborted`);
}

async function rollback(r, all) {
  const running = await agentCount({ version: r.version });
  const cancelled = all.filter((x) => x.version === r.version && isOpen(x)).reduce((n, x) => n + unfinished(x), 0);
  await act(`Roll back ${r.version}: it is blocked on every platform, its ${plural(cancelled, 'unfinished update')} `
    + `${are(cancelled)} cancelled, and ${plural(running, 'agent')} running it will be moved to the newest other build of their `
    + 'channel (paused agents and those declining updates are skipped).', 'Roll back',
  () => api('POST', `/api/v1/rollouts/${enc(r.version)}/rollback`), `${r.version} is rolled back`);
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

// ---------------------------------------------------------------- agents

// Kept across visits, so going to an agent and back keeps the search.
const agentFilters = { q: '', site: '', channel: '', version: '', online: '', paused: '', offset: 0 };

function agents(main) {
  const sites = new Map();
  const body = h('div');
  const pager = h('div', { class: 'pager' });
  const field = (name, control) => {
    control.value = agentFilters[name];
    control.addEventListener(control.tagName === 'SELECT' ? 'change' : 'input', () => {
      agentFilters[name] = control.value;
      agentFilters.offset = 0;
      clearTimeout(field.timer);
      field.timer = setTimeout(load, 250);
    });
    return control;
  };
  const choice = (name, options) => field(name, h('select', { 'aria-label': name },
    options.map(([value, label]) => h('option', { value }, label))));
  const siteSelect = choice('site', [['', 'any site']]);
  main.append(h('h2', {}, 'Agents'), h('div', { class: 'filters' },
    field('q', h('input', { id: 'agent-search', type: 'search', placeholder: 'hostname or id' })),
    siteSelect,
    choice('channel', [['', 'any channel'], ['stable', 'stable'], ['beta', 'beta']]),
    field('version', h('input', { placeholder: 'version', size: 10 })),
    choice('online', [['', 'online or not'], ['true', 'online'], ['false', 'offline']]),
    choice('paused', [['', 'paused or not'], ['true', 'paused'], ['false', 'not paused']])),
  body, pager);

  get('/api/v1/sites').then((list) => {
    for (const site of list) {
      sites.set(site.id, site.name);
      siteSelect.append(h('option', { value: site.id }, site.name));
    }
    siteSelect.value = agentFilters.site;
  }).catch(() => {});

  const load = guard(body, async () => {
    const page = await get(`/api/v1/agents?${query({ ...agentFilters, limit: PAGE })}`);
    body.replaceChildren(table(
      ['', 'Hostname', 'Version', 'Platform', 'Site', 'Channel', 'Last seen'],
      page.agents.map((a) => h('tr', { 'data-agent': a.id },
        h('td', {}, h('span', { class: a.online ? 'dot on' : 'dot', title: a.online ? 'online' : 'offline' })),
        h('td', {}, h('a', { href: `#/agents/${enc(a.id)}` }, a.hostname),
          a.paused ? h('span', { class: 'marker paused' }, 'paused') : null,
          a.pending_update ? h('span', { class: 'marker pending' }, `updating to ${a.pending_update}`) : null),
        h('td', {}, a.version), h('td', {}, platform(a)), h('td', {}, sites.get(a.site_id) || a.site_id),
        h('td', {}, a.channel, ' ', h('small', { class: 'muted' }, `(${a.channel_source})`)),
        h('td', {}, ago(a.last_seen)))),
      'No agent matches.'));
    const first = page.total === 0 ? 0 : agentFilters.offset + 1;
    const last = agentFilters.offset + page.agents.length;
    const move = (by) => () => { agentFilters.offset = Math.max(0, agentFilters.offset + by); load(); };
    pager.replaceChildren(
      h('button', { type: 'button', disabled: agentFilters.offset === 0, onclick: move(-PAGE) }, '‹ Previous'),
      h('span', { id: 'agent-total' }, `${first}–${last} of ${page.total}`),
      h('button', { type: 'button', disabled: last >= page.total, onclick: move(PAGE) }, 'Next ›'));
  });
  return { refresh(events) { if (touches(events, 'agent', 'task', 'rollout', 'settings')) load(); } };
}

// ---------------------------------------------------------------- one agent

function agentDetail(main, id) {
  const body = h('div');
  main.append(h('p', {}, h('a', { href: '#/agents' }, '‹ Agents')), body);
  const load = guard(body, async () => {
    const [a, why] = await Promise.all([get(`/api/v1/agents/${enc(id)}`), get(`/api/v1/agents/${enc(id)}/explain`)]);
    const facts = [
      ['Id', h('span', { class: 'mono' }, a.id)], ['Hostname', a.hostname], ['Version', a.version],
      ['Platform', platform(a)], ['Site', h('span', { class: 'mono' }, a.site_id)],
      ['Channel', `${a.channel} (set at ${a.channel_source} level)`],
      ['Online', a.online ? 'yes' : 'no'], ['Last seen', `${a.last_seen} (${ago(a.last_seen)})`],
      ['Enrolled', a.enrolled_at], ['Updates', a.paused ? 'paused' : (a.auto_update ? 'automatic' : 'off on the agent')],
      ['Pending update', a.pending_update || 'none'], ['Fingerprint', h('span', { class: 'mono' }, a.fingerprint)],
      ['Decision', `${why.decision}: ${why.reason}`], ['Next', why.next],
    ];
    body.replaceChildren(
      h('h2', {}, a.hostname, a.paused ? h('span', { class: 'marker paused' }, 'paused') : null),
      h('dl', { class: 'identity' }, facts.map(([k, v]) => [h('dt', {}, k), h('dd', {}, v)])),
      canAct() ? agentActions(a) : '',
      h('h2', {}, 'Update tasks'),
      table(['Created', 'Updated', 'Update', 'Kind', 'Status', 'Attempts', 'Progress', 'Error'],
        a.tasks.map((t) => h('tr', {},
          h('td', {}, t.created_at), h('td', {}, ago(t.updated_at)),
          h('td', {}, `${t.from_version} → ${t.to_version}`), h('td', {}, t.kind),
          h('td', {}, state(t.status), t.failure_class
            ? h('span', { class: `failure-class ${t.failure_class}`, title: 'failure class' }, t.failure_class) : null),
          h('td', {}, t.attempts), h('td', {}, t.bytes_total ? `${Math.round((100 * t.bytes_done) / t.bytes_total)}%` : ''),
          h('td', { class: 'error' }, t.error || ''))),
        'No update tasks yet.'));
  });
  return {
    refresh(events) {
      const concerns = (e) => (e.kind === 'agent' && e.id === id) || (e.kind === 'task' && e.agent === id)
        || e.kind === 'release' || e.kind === 'rollout' || e.kind === 'settings';
      if (events === null || events.some(concerns)) load();
    },
  };
}

function agentActions(a) {
  const base = `/api/v1/agents/${enc(a.id)}`;
  const channel = h('select', { 'aria-label': 'channel' },
    [['', 'inherit from site'], ['stable', 'stable'], ['beta', 'beta']].map(([v, l]) => h('option', { value: v }, l)));
  channel.value = a.channel_source === 'agent' ? a.channel : '';
  return h('div', { class: 'actions' },
    a.paused
      ? actionButton('Resume updates', () => act(`Resume automatic updates of ${a.hostname}.`, 'Resume',
        () => api('POST', `${base}/resume`), `${a.hostname} resumed`))
      : actionButton('Pause updates', () => act(`Pause automatic updates of ${a.hostname}: it stays on ${a.version} until resumed.`,
        'Pause', () => api('POST', `${base}/pause`), `${a.hostname} paused`)),
    // The server refuses an update now to a paused agent: resume it first.
    a.paused ? null : actionButton('Update now', () => act(`Update ${a.hostname} now from ${a.version} to the newest `
      + `${a.channel} build (a targeted rollout of this one agent); any unfinished task is cancelled.`, 'Update now',
    () => api('POST', `${base}/update`), `update sent to ${a.hostname}`)),
    channel,
    actionButton('Set channel', () => act(channel.value
      ? `Put ${a.hostname} on the ${channel.value} channel (now ${a.channel}, from its ${a.channel_source}).`
      : `Clear ${a.hostname}'s own channel: it follows its site (or client) again.`, 'Set channel',
    () => api('PUT', `${base}/channel`, { channel: channel.value || null }), `channel of ${a.hostname} set`)));
}

// ---------------------------------------------------------------- releases

function releases(main) {
  const body = h('div');
  main.append(body);
  const load = guard(body, async () => {
    const listing = await get('/api/v1/releases?include=skipped');
    body.replaceChildren(
      h('h2', {}, 'Offered builds'),
      table(['Version', 'Platform', 'Channel', 'Size', 'Signed', 'SHA-256', 'File'],
        listing.releases.map((r) => h('tr', {},
          h('td', {}, r.version, r.blocked ? h('span', { class: 'marker paused' }, 'blocked') : null),
          h('td', {}, platform(r)), h('td', {}, state(r.channel)), h('td', {}, bytes(r.size)),
          h('td', {}, r.signed ? 'yes' : 'no'), h('td', { class: 'mono', title: r.sha256 }, r.sha256.slice(0, 12)),
          h('td', { class: 'mono' }, r.file))),
        'No build is offered.'),
      h('h2', {}, 'Skipped files'),
      table(['File', 'Why it is not offered'],
        listing.skipped.map((s) => h('tr', {}, h('td', { class: 'mono' }, s.file), h('td', {}, s.reason))),
        'Every file in the downloads directory is offered.'));
  });
  return { refresh(events) { if (touches(events, 'release', 'rollout')) load(); } };
}

// ---------------------------------------------------------------- audit

const AUDIT_ACTIONS = ['rollout.promote', 'rollout.rollback', 'rollout.unblock', 'rollout.create', 'rollout.pause',
  'rollout.resume', 'rollout.advance', 'rollout.abort', 'rollout.halt',
  'agent.pause', 'agent.resume', 'agent.update', 'agent.channel', 'agent.reenroll', 'site.channel', 'client.channel',
  'releases.rescan', 'updates.switch', 'token.create', 'token.revoke', 'enrollment_token.create', 'client.create',
  'site.create', 'session.login'];

function audit(main) {
  const filter = h('select', { 'aria-label': 'action' }, h('option', { value: '' }, 'every action'),
    AUDIT_ACTIONS.map((a) => h('option', { value: a }, a)));
  const body = h('div');
  const more = h('div', { class: 'pager' });
  filter.addEventListener('change', () => load());
  main.append(h('h2', {}, 'Audit log'), h('div', { class: 'filters' }, filter), body, more);
  const rows = (entries) => entries.map((e) => h('tr', {},
    h('td', { title: e.at }, ago(e.at)), h('td', {}, e.actor), h('td', { class: 'mono' }, e.action),
    h('td', {}, e.target), h('td', {}, e.result), h('td', {}, e.detail || '')));
  const fetchPage = (before) => get(`/api/v1/audit?${query({ limit: 100, action: filter.value, before })}`);
  const showMore = (next) => more.replaceChildren(next === null ? '' : h('button', {
    type: 'button',
    onclick: async () => {
      const page = await fetchPage(next);
      body.querySelector('tbody').append(...rows(page.entries));
      showMore(page.next_before);
    },
  }, 'Older entries'));
  const load = guard(body, async () => {
    const page = await fetchPage(null);
    body.replaceChildren(table(['When', 'Who', 'Action', 'Target', 'Result', 'Detail'], rows(page.entries),
      'No entries.'));
    showMore(page.next_before);
  });
  return { refresh(events) { if (touches(events, 'rollout', 'settings', 'release')) load(); } };
}

// ---------------------------------------------------------------- routing

const VIEWS = { overview, rollouts, agents, releases, audit };

function route() {
  if (me === null) return;
  const [name, arg] = location.hash.replace(/^#\/?/, '').split('/');
  const view = arg && name === 'agents' ? agentDetail : VIEWS[name];
  if (!view) {
    location.hash = '#/overview';
    return;
  }
  for (const link of document.querySelectorAll('nav a')) {
    link.classList.toggle('active', link.dataset.view === name);
  }
  const main = $('main');
  main.replaceChildren();
  current = view(main, arg ? decodeURIComponent(arg) : undefined);
  current.refresh(null);
}

// Whether any of the events (null: a full load) is of one of the kinds.
const touches = (events, ...kinds) => events === null || events.some((e) => kinds.includes(e.kind));

// ---------------------------------------------------------------- live updates

let source = null;
let queued = [];
let flush = null;

// Events arriving together are handled together, once, after a short pause: a burst of
// agents reconnecting costs one re-fetch, not one per agent.
function onEvent(event) {
  queued.push(event);
  if (flush) return;
  flush = setTimeout(() => {
    const events = queued;
    queued = [];
    flush = null;
    // A resync means notes were missed: everything on screen is re-read.
    if (current) current.refresh(events.some((e) => e.kind === 'resync') ? null : events);
  }, 200);
}

function listen() {
  if (source) return;
  let opened = false;
  source = new EventSource('/api/v1/events');
  source.onopen = () => {
    $('live').classList.add('on');
    $('live').title = 'Live updates: on';
    // Whatever happened while disconnected (a server restart) was not heard: load all.
    if (opened && current) current.refresh(null);
    opened = true;
  };
  source.onmessage = (message) => onEvent(JSON.parse(message.data));
  source.onerror = () => {
    $('live').classList.remove('on');
    $('live').title = 'Live updates: reconnecting';
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
  $('live').classList.remove('on');
}

// ---------------------------------------------------------------- login

function showLogin(message) {
  me = null;
  current = null;
  stopListening();
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
  // Other nodes' changes and ages ("5m ago") have no event; a slow full refresh covers them.
  setInterval(() => { if (current && !document.hidden) current.refresh(null); }, 30000);
  checkSession().catch((err) => showLogin(`The server did not answer: ${err.message}`));
});
