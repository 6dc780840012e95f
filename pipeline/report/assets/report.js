// The cluster browser. Every piece of corpus text reaches the page through textContent,
// never innerHTML: a context holding markup shows its characters and runs nothing.
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("quanta-data").textContent);
  var S = data.strings;

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = text;
    return e;
  }
  // Make whitespace visible: space, tab, carriage return and newline get a glyph each.
  function visible(s) {
    return s.replace(/ /g, "\u00b7").replace(/\t/g, "\u2192").replace(/\r/g, "\u240d").replace(/\n/g, "\u21b5");
  }
  function fixed(x, d) { return x === null || x === undefined ? "\u2013" : Number(x).toFixed(d); }
  // Losses span many decades (1e-6 nats for a saturated answer): small ones in exponent form.
  function loss(x) {
    if (x === null || x === undefined) return "\u2013";
    var v = Number(x);
    return v !== 0 && Math.abs(v) < 1e-3 ? v.toExponential(1) : v.toFixed(4);
  }
  // Parameter counts and steps, short: 252, 28.4k, 1.2M, 1.4B.
  function short(x) {
    if (x === null || x === undefined) return "\u2013";
    var v = Number(x), units = [[1e9, "B"], [1e6, "M"], [1e3, "k"]];
    for (var i = 0; i < units.length; i++) if (v >= units[i][0]) return (v / units[i][0]).toFixed(v >= 10 * units[i][0] ? 0 : 1) + units[i][1];
    return String(Math.round(v));
  }
  // An emergence point with its censoring: "<= x" learned at the first point, "> x" at none.
  function emergence(c, key, curve) {
    var cens = c[key + "_censored"];
    if (cens === null || cens === undefined) return "\u2013";
    if (cens === "left") return "\u2264 " + short(c[key]);
    if (cens === "right") return "> " + short(curve.length ? curve[curve.length - 1][0] : null);
    return short(c[key]);
  }
  // The SVG namespace, as the HTML parser gave it to the page's empty <svg> (no URL in the script).
  var SVG = document.getElementById("svg-ns").namespaceURI;
  function svg(tag, attrs) {
    var e = document.createElementNS(SVG, tag);
    Object.keys(attrs).forEach(function (k) { e.setAttribute(k, attrs[k]); });
    return e;
  }
  // A small chart of one curve: mean loss (solid, left axis) and the share of members
  // learned (dashed, 0..1 on the right) against log x; a vertical line at the emergence point.
  function chart(curve, title, xName, at) {
    var W = 280, H = 150, L = 42, R = 30, T = 20, B = 30;
    var box = svg("svg", { "class": "chart", width: W, height: H, viewBox: "0 0 " + W + " " + H, role: "img" });
    var t = svg("text", { x: L, y: 13, "class": "title" }); t.textContent = title; box.appendChild(t);
    var pts = curve.filter(function (p) { return p[0] > 0 && p[1] !== null; });
    if (pts.length < 2) {
      var n = svg("text", { x: L, y: H / 2 }); n.textContent = "one point: no curve"; box.appendChild(n);
      return box;
    }
    var lx = pts.map(function (p) { return Math.log(p[0]); });
    var x0 = Math.min.apply(null, lx), x1 = Math.max.apply(null, lx);
    var ys = pts.map(function (p) { return p[1]; });
    var y1 = Math.max.apply(null, ys), y0 = Math.min(0, Math.min.apply(null, ys));
    if (y1 <= y0) y1 = y0 + 1;
    function X(v) { return L + (Math.log(v) - x0) / (x1 - x0 || 1) * (W - L - R); }
    function Y(v) { return T + (1 - (v - y0) / (y1 - y0)) * (H - T - B); }
    function F(v) { return T + (1 - v) * (H - T - B); }
    box.appendChild(svg("rect", { x: L, y: T, width: W - L - R, height: H - T - B, "class": "frame" }));
    [[y1, Y(y1)], [y0, Y(y0)]].forEach(function (a) {
      var tx = svg("text", { x: L - 4, y: a[1] + 4, "text-anchor": "end" }); tx.textContent = a[0].toFixed(2); box.appendChild(tx);
    });
    [["1", F(1)], ["0", F(0)]].forEach(function (a) {
      var tx = svg("text", { x: W - R + 4, y: a[1] + 4 }); tx.textContent = a[0]; box.appendChild(tx);
    });
    [pts[0][0], pts[pts.length - 1][0]].forEach(function (v, i) {
      var tx = svg("text", { x: X(v), y: H - B + 14, "text-anchor": i ? "end" : "start" }); tx.textContent = short(v); box.appendChild(tx);
    });
    var xl = svg("text", { x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle" }); xl.textContent = xName; box.appendChild(xl);
    if (at !== null && at !== undefined && at > 0) box.appendChild(svg("line", { x1: X(at), x2: X(at), y1: T, y2: H - B, "class": "emerge" }));
    box.appendChild(svg("polyline", { points: pts.map(function (p) { return X(p[0]) + "," + Y(p[1]); }).join(" "), "class": "loss" }));
    var fr = pts.filter(function (p) { return p[2] !== null; });
    box.appendChild(svg("polyline", { points: fr.map(function (p) { return X(p[0]) + "," + F(p[2]); }).join(" "), "class": "learned" }));
    pts.forEach(function (p) { box.appendChild(svg("circle", { cx: X(p[0]), cy: Y(p[1]), r: 2.5, "class": "loss" })); });
    return box;
  }

  function chip(text, count) {
    var c = el("span", "chip", visible(text));
    if (count !== undefined) { c.appendChild(document.createTextNode(" ")); c.appendChild(el("small", null, "\u00d7" + count)); }
    return c;
  }

  var table = document.getElementById("clusters");
  var tbody = table.querySelector("tbody");
  var count = document.getElementById("count");
  var search = document.getElementById("search");
  var detail = document.getElementById("detail");
  var hideNgram = document.getElementById("hide-ngram");
  var byId = {};
  // Ranked by quality by default (clusters without one, of a single member, last).
  var sortKey = "quality", sortDir = -1, selected = null;
  // id -1 holds the samples the cut left in no cluster (cluster.cut: data)
  function name(c) { return c.id < 0 ? "unassigned" : "#" + c.id; }
  function belowNull(c) { return c.null_z !== null && c.null_z !== undefined && c.null_z < data.null_z_min; }
  function ngramExplained(c) { return c.ngram_f1 !== null && c.ngram_f1 !== undefined && c.ngram_f1 >= data.ngram_f1_min; }

  data.clusters.forEach(function (c) {
    byId[c.id] = c;
    var tr = el("tr", belowNull(c) ? "below-null" : null);
    tr.dataset.id = c.id;
    tr.appendChild(el("td", "num", name(c)));
    tr.appendChild(el("td", "num", String(c.size)));
    var lab = el("td", "label", c.label === null || c.label === undefined ? "\u2013" : c.label);
    if (c.label_kind) lab.title = c.label_kind + " rule; held-out precision " + fixed(c.label_precision, 2) + ", recall " + fixed(c.label_recall, 2);
    tr.appendChild(lab);
    tr.appendChild(el("td", "num", fixed(c.label_f1, 2)));
    var qual = el("td", "num", fixed(c.quality, 3));
    if (belowNull(c)) qual.appendChild(el("small", "flag", " below null"));
    tr.appendChild(qual);
    tr.appendChild(el("td", "num", fixed(c.stability, 2)));
    tr.appendChild(el("td", "num", fixed(c.null_z, 1)));
    tr.appendChild(el("td", "num", emergence(c, "n_star", c.curve_size || [])));
    tr.appendChild(el("td", "num", emergence(c, "s_star", c.curve_step || [])));
    tr.appendChild(el("td", "num", fixed(c.abrupt_size, 2)));
    var top = el("td");
    c.top.forEach(function (t) { top.appendChild(chip(t[0], t[1])); });
    tr.appendChild(top);
    tr.appendChild(el("td", "num", loss(c.mean_loss)));
    if (data.planted) tr.appendChild(el("td", "num", fixed(c.purity, 2) + (c.quantum === null ? "" : " (q" + c.quantum + ")")));
    tr.addEventListener("click", function () { select(c.id); });
    c.tr = tr;
  });

  // What a search matches: the cluster id, its top tokens and the text of its examples.
  function haystack(c) {
    if (c.hay === undefined) {
      var parts = [name(c), c.label || ""];
      c.top.forEach(function (t) { parts.push(t[0]); });
      c.examples.forEach(function (ex) { parts.push(ex.ctx.map(function (i) { return S[i]; }).join("")); });
      c.hay = parts.join("\n").toLowerCase();
    }
    return c.hay;
  }

  function refresh() {
    var q = search.value.trim().toLowerCase();
    var list = data.clusters.slice().sort(function (a, b) {
      var x = a[sortKey], y = b[sortKey];
      if (x === y) return a.id - b.id;
      if (x === null) return 1;
      if (y === null) return -1;
      return (x < y ? -1 : 1) * sortDir;
    });
    var shown = 0, frag = document.createDocumentFragment();
    list.forEach(function (c) {
      var ok = (!q || String(c.id) === q.replace(/^#/, "") || haystack(c).indexOf(q) >= 0) &&
        !(hideNgram.checked && ngramExplained(c));
      c.tr.hidden = !ok;
      if (ok && c.id >= 0) shown++;
      frag.appendChild(c.tr);
    });
    tbody.appendChild(frag);
    count.textContent = shown + " of " + data.clusters.filter(function (c) { return c.id >= 0; }).length + " clusters" + (q ? " match \u201c" + search.value.trim() + "\u201d" : "") +
      (hideNgram.checked ? " (n-gram-explained hidden)" : "");
  }

  table.querySelectorAll("th[data-key]").forEach(function (th) {
    th.addEventListener("click", function () {
      var key = th.dataset.key;
      sortDir = key === sortKey ? -sortDir : (key === "id" ? 1 : -1);
      sortKey = key;
      table.querySelectorAll("th[data-key]").forEach(function (h) { h.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", sortDir > 0 ? "ascending" : "descending");
      refresh();
    });
  });
  search.addEventListener("input", refresh);
  hideNgram.addEventListener("change", refresh);

  function renderExample(ex) {
    var box = el("div", "example");
    var meta = "sample " + ex.s + " \u00b7 doc " + ex.d + " \u00b7 pos " + ex.p;
    if (data.planted) meta += " \u00b7 planted quantum " + (ex.q < 0 ? "none" : ex.q);
    box.appendChild(el("div", "meta", meta));
    var ctx = el("div", "ctx");
    if (ex.start > 0) ctx.appendChild(el("span", "more", "\u2026 "));
    var last = ex.ctx.length - 1;
    ex.ctx.forEach(function (i, j) {
      var s = S[i];
      var cls = "tok" + (/^\s+$/.test(s) ? " ws" : "") + (j === last ? " target" : "");
      var span = el("span", cls, visible(s));
      span.title = JSON.stringify(s) + (j === last ? "  target, loss " + loss(ex.l) + " nats" : "");
      ctx.appendChild(span);
      if (j === last) ctx.appendChild(el("span", "loss", loss(ex.l) + " nats"));
      else if (s.indexOf("\n") >= 0) ctx.appendChild(el("br"));
    });
    box.appendChild(ctx);
    return box;
  }

  function select(id) {
    var c = byId[id];
    if (!c) return;
    if (selected) selected.tr.classList.remove("selected");
    selected = c;
    c.tr.classList.add("selected");
    detail.textContent = "";
    detail.appendChild(el("h3", null, c.id < 0 ? "Unassigned samples (in no cluster)" : "Cluster #" + c.id));
    var m = c.size + " samples \u00b7 mean loss " + loss(c.mean_loss) + " nats";
    if (data.planted) m += " \u00b7 purity " + fixed(c.purity, 2) + (c.quantum === null ? "" : " (majority planted quantum " + c.quantum + ")");
    detail.appendChild(el("div", "meta", m));
    if (c.label) {
      detail.appendChild(el("div", "meta", "label: " + c.label + "  (" + c.label_kind + " rule; held-out precision " +
        fixed(c.label_precision, 2) + ", recall " + fixed(c.label_recall, 2) + ", F1 " + fixed(c.label_f1, 2) +
        "; best n-gram F1 " + fixed(c.ngram_f1, 2) + ")"));
    }
    detail.appendChild(el("div", "meta", "quality " + fixed(c.quality, 3) + " \u00b7 coherence " + fixed(c.coherence, 3) +
      " \u00b7 separation " + fixed(c.separation, 3) + " \u00b7 null z " + fixed(c.null_z, 1) + " \u00b7 stability " +
      fixed(c.stability, 2) + " (across projection seeds " + fixed(c.projection_stability, 2) + ")" + (belowNull(c) ? " \u00b7 below its null: not distinguishable from a random group" : "")));
    if (c.curve_size && (c.curve_size.length || (c.curve_step && c.curve_step.length))) {
      detail.appendChild(el("div", "meta", "emergence: N* " + emergence(c, "n_star", c.curve_size) + " non-embedding parameters" +
        " \u00b7 S* " + emergence(c, "s_star", c.curve_step || []) + " steps \u00b7 abruptness over sizes " + fixed(c.abrupt_size, 2) +
        ", over steps " + fixed(c.abrupt_step, 2)));
      var charts = el("div", "charts");
      if (c.curve_size.length) charts.appendChild(chart(c.curve_size, "members' loss against model size", "non-embedding parameters N", c.n_star));
      if (c.curve_step && c.curve_step.length) charts.appendChild(chart(c.curve_step, "members' loss over training", "step", c.s_star));
      detail.appendChild(charts);
      detail.appendChild(el("div", "meta", "solid: the members' mean loss (nats, left axis) \u00b7 dashed: the share of members under select.max_loss (right axis) \u00b7 dotted: N* or S*"));
    }
    var top = el("div", "meta", "top answer tokens: ");
    c.top.forEach(function (t) { top.appendChild(chip(t[0], t[1])); });
    detail.appendChild(top);
    c.examples.forEach(function (ex) { detail.appendChild(renderExample(ex)); });
    if (history.replaceState) history.replaceState(null, "", "#cluster-" + c.id);
  }

  refresh();
  var m = /^#cluster-(\d+)$/.exec(location.hash);
  var firstRow = tbody.querySelector("tr:not([hidden])");
  var first = firstRow ? Number(firstRow.dataset.id) : null;
  if (m && byId[m[1]]) select(Number(m[1]));
  else if (first !== null) select(first);
  document.body.dataset.ready = "1";
})();
