// Optimus live page: polls /api/v1/snapshot every second and redraws. Every text from the
// agent goes in through textContent, never parsed as HTML: VM names come from guests' owners.
'use strict';

const SVG = 'http://www.w3.org/2000/svg';
const WINDOW_S = 900;
const $ = (id) => document.getElementById(id);
let points = [];
let names = {};

const fmt = {
  w: (w) => (w == null ? '–' : w.toFixed(2) + ' W'),
  j: (j) => (j < 1e4 ? j.toFixed(1) + ' J' : j < 3.6e6 ? (j / 1e3).toFixed(2) + ' kJ' : (j / 3.6e6).toFixed(3) + ' kWh'),
  g: (g) => (g == null ? '–' : g < 10 ? g.toFixed(3) + ' g' : g < 1e4 ? g.toFixed(1) + ' g' : (g / 1e3).toFixed(2) + ' kg'),
  bps: (b) => (b == null ? '–' : b < 1e3 ? b.toFixed(0) + ' B/s' : b < 1e6 ? (b / 1e3).toFixed(1) + ' kB/s' : (b / 1e6).toFixed(1) + ' MB/s'),
  pct: (f) => (f == null ? '–' : (f * 100).toFixed(0) + '%'),
};

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text != null) e.textContent = text;
  if (cls) e.className = cls;
  return e;
}

function svgEl(tag, attrs) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  return e;
}

function fill(tbody, rows) {
  tbody.replaceChildren(...rows);
}

function drawBar(split, total) {
  const bar = $('split-bar');
  bar.replaceChildren();
  if (!split || !(total > 0)) return;
  let x = 0;
  for (const part of ['vms', 'host', 'idle']) {
    const w = (600 * split[part]) / total;
    bar.append(svgEl('rect', { x: x.toFixed(2), y: 0, width: Math.max(0, w).toFixed(2), height: 24, class: part }));
    x += w;
  }
}

function drawNode(doc) {
  const n = doc.node;
  $('node-total').textContent = fmt.w(n.power_watts);
  const s = n.split_watts;
  const total = s ? s.vms + s.host + s.idle : 0;
  drawBar(s, total);
  const legend = [];
  for (const [part, label] of [['vms', 'VMs'], ['host', 'host'], ['idle', 'idle']]) {
    const li = el('li', null, part);
    li.id = 'split-' + part;
    const v = s ? s[part] : null;
    const share = s && total > 0 ? ' (' + ((100 * v) / total).toFixed(0) + '%)' : '';
    li.append(el('span', label + ' ' + fmt.w(v) + share));
    legend.push(li);
  }
  $('split').replaceChildren(...legend);
  fill($('zones').tBodies[0], n.zones.map((z) => {
    const tr = el('tr');
    tr.append(el('td', z.zone), el('td', z.device),
      el('td', z.available ? fmt.w(z.watts) : 'unavailable', 'num'),
      el('td', z.measured ? 'measured (' + z.source + ')' : 'estimated (a model, no meter)', z.measured ? '' : 'estimated'));
    return tr;
  }));
  const c = doc.carbon;
  $('grid').textContent = !c ? 'No grid carbon intensity configured: no CO2 figures.'
    : c.intensity_g_per_kwh == null ? 'Grid carbon intensity: no value yet.'
    : 'Grid carbon intensity ' + c.intensity_g_per_kwh.toFixed(0) + ' g/kWh (' + c.source +
      (c.zone && c.zone !== c.source ? ' ' + c.zone : '') + (c.age_seconds != null ? ', ' + c.age_seconds.toFixed(0) + ' s old' : '') + ')';
}

function drawVms(doc) {
  const rows = doc.vms.slice().sort((a, b) => b.power_watts - a.power_watts || a.name.localeCompare(b.name));
  fill($('vms').tBodies[0], rows.length ? rows.map((vm) => {
    const tr = el('tr');
    tr.dataset.uuid = vm.uuid;
    const name = el('td', vm.name, 'name');
    name.append(el('small', vm.uuid));
    const vcpus = vm.vcpus.map((v) => 'vCPU ' + v.vcpu + ' ' + fmt.pct(v.busy)).join(' · ');
    const io = vm.block_io;
    const rate = io.read_bytes_per_second == null ? null : io.read_bytes_per_second + io.write_bytes_per_second;
    tr.append(name, el('td', fmt.w(vm.power_watts), 'num power'), el('td', fmt.j(vm.energy_joules), 'num energy'),
      el('td', fmt.g(vm.carbon_grams), 'num grams'), el('td', vcpus || '–', 'vcpu'),
      el('td', fmt.bps(rate), 'num io'), el('td', vm.phase || '–', 'phase'));
    return tr;
  }) : [(() => { const tr = el('tr'); const td = el('td', 'No VMs on this host.'); td.colSpan = 7; tr.append(td); return tr; })()]);
  const a = doc.agent;
  $('agent').textContent = 'Agent ' + doc.version + ': sample ' + a.samples + ', ' + a.cpu_seconds.toFixed(1) +
    ' s CPU, ' + (a.resident_bytes / 1048576).toFixed(1) + ' MiB resident, ' + a.ebpf_events + ' eBPF events, ' +
    a.ebpf_dropped + ' dropped, ' + a.sample_errors + ' sample errors.';
}

// A chart of the points held (at most 15 minutes, at least one): stacked areas (`stack`)
// and lines (`lines`), each {cls, values[]} aligned with `pts`.
function chart(svg, pts, now, stack, lines) {
  svg.replaceChildren();
  const W = 600, H = 180, L = 40, B = 16;
  const span = Math.min(WINDOW_S, Math.max(60, pts.length ? now - pts[0].t : 0));
  const x = (t) => L + ((W - L) * (t - (now - span))) / span;
  let max = 0;
  pts.forEach((_, i) => {
    max = Math.max(max, stack.reduce((s, d) => s + (d.values[i] || 0), 0), ...lines.map((d) => d.values[i] || 0));
  });
  max = max > 0 ? max * 1.1 : 1;
  const y = (v) => H - B - ((H - B - 4) * v) / max;
  svg.append(svgEl('line', { x1: L, y1: H - B, x2: W, y2: H - B, class: 'axis' }),
    svgEl('line', { x1: L, y1: 4, x2: L, y2: H - B, class: 'axis' }));
  const label = (tx, ty, text, anchor) => {
    const t = svgEl('text', { x: tx, y: ty, 'text-anchor': anchor });
    t.textContent = text;
    svg.append(t);
  };
  label(L - 4, 12, (max / 1.1).toFixed(1) + ' W', 'end');
  label(L - 4, H - B, '0', 'end');
  label(L, H - 3, '−' + (span >= 120 ? (span / 60).toFixed(0) + ' min' : span.toFixed(0) + ' s'), 'start');
  label(W, H - 3, 'now', 'end');
  if (pts.length < 2) return;
  const base = pts.map(() => 0);
  for (const d of stack) {
    const top = base.map((b, i) => b + (d.values[i] || 0));
    const up = pts.map((p, i) => x(p.t).toFixed(1) + ',' + y(top[i]).toFixed(1));
    const down = pts.map((p, i) => x(p.t).toFixed(1) + ',' + y(base[i]).toFixed(1)).reverse();
    svg.append(svgEl('polygon', { points: up.concat(down).join(' '), class: d.cls }));
    top.forEach((v, i) => { base[i] = v; });
  }
  for (const d of lines) {
    const ps = [];
    pts.forEach((p, i) => { if (d.values[i] != null) ps.push(x(p.t).toFixed(1) + ',' + y(d.values[i]).toFixed(1)); });
    svg.append(svgEl('polyline', { points: ps.join(' '), class: 'line ' + d.cls }));
  }
}

function drawCharts(now) {
  const cut = now - WINDOW_S;
  points = points.filter((p) => p.t >= cut);
  const pick = (f) => points.map(f);
  chart($('chart-split'), points, now,
    [{ cls: 'idle', values: pick((p) => p.idle) }, { cls: 'host', values: pick((p) => p.host) },
      { cls: 'vms', values: pick((p) => p.vms) }],
    [{ cls: 'node', values: pick((p) => p.node) }]);
  const uuids = [...new Set(points.flatMap((p) => Object.keys(p.vm)))].slice(0, 8);
  chart($('chart-vms'), points, now, [],
    uuids.map((u, i) => ({ cls: 'c' + i, values: pick((p) => (u in p.vm ? p.vm[u] : null)) })));
  $('legend-vms').replaceChildren(...uuids.map((u, i) => {
    const li = el('li', null, 'c' + i);
    li.append(el('span', names[u] || u));
    return li;
  }));
}

async function tick() {
  const since = points.length ? points[points.length - 1].t : null;
  const status = $('status');
  try {
    const r = await fetch('/api/v1/snapshot' + (since == null ? '' : '?since=' + since), { cache: 'no-store' });
    if (!r.ok) throw new Error('HTTP ' + r.status);
    const doc = await r.json();
    Object.assign(names, doc.history.names);
    points = points.concat(doc.history.points);
    drawNode(doc);
    drawVms(doc);
    const now = doc.time || Date.now() / 1000;
    drawCharts(now);
    status.textContent = 'live, ' + new Date(now * 1000).toLocaleTimeString();
    status.className = 'status';
  } catch (e) {
    status.textContent = 'agent unreachable (' + e.message + '), retrying';
    status.className = 'status error';
  }
  setTimeout(tick, 1000);
}

tick();
