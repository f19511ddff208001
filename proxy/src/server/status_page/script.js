'use strict';
// Polls /status once a second and redraws the page from it. Everything is
// built with DOM calls and textContent: nothing from the server is parsed
// as HTML.
(function () {
  var SVG = 'http://www.w3.org/2000/svg';
  var polls = 0;

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }

  function svg(tag, attrs) {
    var e = document.createElementNS(SVG, tag);
    Object.keys(attrs).forEach(function (k) { e.setAttribute(k, String(attrs[k])); });
    return e;
  }

  function bytes(n) {
    if (n === null || n === undefined) return '—';
    if (n < 1024) return n + ' B';
    if (n < 1048576) return (n / 1024).toFixed(1) + ' KiB';
    return (n / 1048576).toFixed(1) + ' MiB';
  }

  function secs(s) {
    if (s === null || s === undefined) return '—';
    return s < 1 ? (s * 1000).toFixed(1) + ' ms' : s.toFixed(2) + ' s';
  }

  // A sparkline of the samples (nulls are gaps), 160 × 28.
  function spark(values) {
    var w = 160, h = 28, s = svg('svg', { 'class': 'spark', width: w, height: h, viewBox: '0 0 ' + w + ' ' + h });
    s.appendChild(svg('line', { x1: 0, y1: h - 1, x2: w, y2: h - 1 }));
    var known = values.filter(function (v) { return v !== null; });
    if (known.length === 0) return s;
    var max = Math.max.apply(null, known.concat([1e-9]));
    var pts = [];
    values.forEach(function (v, i) {
      if (v === null) return;
      var x = values.length < 2 ? w : (i * w) / (values.length - 1);
      pts.push(x.toFixed(1) + ',' + (h - 1 - (v / max) * (h - 4)).toFixed(1));
    });
    s.appendChild(svg('polyline', { points: pts.join(' ') }));
    var t = svg('title', {});
    t.textContent = 'max ' + secs(max) + ' over the last ' + values.length + ' s';
    s.appendChild(t);
    return s;
  }

  // A horizontal bar for a share between 0 and 1, 100 × 12.
  function bar(share) {
    var s = svg('svg', { 'class': 'bar', width: 100, height: 12 });
    s.appendChild(svg('rect', { 'class': 'full', x: 0, y: 0, width: 100, height: 12 }));
    s.appendChild(svg('rect', { 'class': 'part', x: 0, y: 0, width: Math.round(share * 100), height: 12 }));
    return s;
  }

  function cell(tr, content, cls) {
    var td = el('td', cls);
    if (content instanceof Node) td.appendChild(content); else td.textContent = content;
    tr.appendChild(td);
  }

  function render(s) {
    var topo = s.topology || { nodes: [] };
    var history = {};
    (s.history || []).forEach(function (h) { history[h.name] = h; });
    var reads = {}, totalReads = 0, fallbacks = {}, waits = 0, waited = 0;
    (s.stats || []).forEach(function (r) {
      reads[r.node] = (reads[r.node] || 0) + r.reads;
      totalReads += r.reads;
      Object.keys(r.fallbacks).forEach(function (k) { fallbacks[k] = (fallbacks[k] || 0) + r.fallbacks[k]; });
      waits += r.token_waits;
      waited += r.token_wait_seconds;
    });

    var body = el('tbody');
    topo.nodes.forEach(function (n) {
      var tr = el('tr');
      tr.dataset.node = n.name;
      tr.dataset.role = n.role;
      tr.dataset.live = '1';
      cell(tr, n.name);
      cell(tr, n.role, 'role-' + n.role);
      cell(tr, n.healthy ? 'healthy' : 'ejected', n.healthy ? 'ok' : 'down');
      cell(tr, n.timeline === null || n.timeline === undefined ? '—' : n.timeline, 'num');
      cell(tr, n.lsn || '—', 'num');
      cell(tr, bytes(n.lag_bytes), 'num');
      cell(tr, secs(n.lag), 'num');
      cell(tr, spark(history[n.name] ? history[n.name].lag_seconds : []));
      var share = totalReads ? (reads[n.name] || 0) / totalReads : 0;
      var td = el('td');
      td.appendChild(bar(share));
      td.appendChild(document.createTextNode(' ' + Math.round(share * 100) + ' % (' + (reads[n.name] || 0) + ')'));
      tr.appendChild(td);
      body.appendChild(tr);
    });
    var table = document.getElementById('nodes');
    table.replaceChild(body, table.tBodies[0]);

    var fb = el('tbody');
    var reasons = Object.keys(fallbacks).sort();
    reasons.forEach(function (k) {
      var tr = el('tr');
      cell(tr, k);
      cell(tr, fallbacks[k], 'num');
      fb.appendChild(tr);
    });
    var ft = document.getElementById('fallbacks');
    ft.replaceChild(fb, ft.tBodies[0]);

    document.getElementById('waits').textContent =
      waits + ' reads waited for a replica to reach their token' +
      (waits ? ', ' + secs(waited / waits) + ' on average' : '') + '.';
    document.getElementById('summary').textContent =
      'policy ' + s.policy + ' · ' + s.clients + ' clients · ' + totalReads + ' reads · up ' +
      Math.round(s.uptime_seconds) + ' s';
    document.getElementById('error').textContent = '';
    polls += 1;
    document.body.dataset.polls = String(polls);
  }

  function poll() {
    fetch('/status', { cache: 'no-store' })
      .then(function (r) {
        if (!r.ok) throw new Error('/status answered ' + r.status);
        return r.json();
      })
      .then(render)
      .catch(function (e) { document.getElementById('error').textContent = 'cannot refresh: ' + e.message; })
      .then(function () { setTimeout(poll, 1000); });
  }

  poll();
})();
