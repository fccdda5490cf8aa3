// The console: a page of the engine's own API (/3.0/), signed in with the API key, which is kept
// in this tab's session storage and sent as a header, never in a URL. Everything received is
// shown with textContent: parameters, responses and errors are attacker-controlled text.
"use strict";

const KEY = "postbackd.api-key";
const PAGE_SIZE = 50;
const $ = (id) => document.getElementById(id);
const view = { page: 1, snapshot: null, filters: null, rows: [], total: 0, live: null, news: [] };

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

async function api(path, form) {
  const init = { headers: { "API-Key": sessionStorage.getItem(KEY) || "" } };
  if (form) {
    init.method = "POST";
    init.body = new URLSearchParams(form);
  }
  const r = await fetch(path, init);
  let body = null;
  try { body = await r.json(); } catch (_) { /* not JSON: reported below */ }
  if (!r.ok) {
    const why = (body && (body.error || body.message)) || r.statusText;
    const e = new Error(`${r.status}: ${why}`);
    e.status = r.status;
    throw e;
  }
  return body;
}

function today() {
  return localDay(Date.now());
}

// The operator's calendar day of a time (milliseconds), as YYYY-MM-DD.
function localDay(ms) {
  const d = new Date(ms);
  return new Date(d.getTime() - d.getTimezoneOffset() * 60000).toISOString().slice(0, 10);
}

function timezone() {
  try { return Intl.DateTimeFormat().resolvedOptions().timeZone || "UTC"; } catch (_) { return "UTC"; }
}

// "3 min 20 s", "2 h 5 min", "4 d 3 h": how long after its click a postback came.
function human(seconds) {
  if (seconds === null || seconds === undefined) return "";
  const s = Math.max(0, Number(seconds));
  const units = [["d", 86400], ["h", 3600], ["min", 60], ["s", 1]];
  const parts = [];
  let rest = s;
  for (const [name, size] of units) {
    if (rest >= size || (parts.length === 0 && size === 1)) {
      parts.push(`${Math.floor(rest / size)} ${name}`);
      rest %= size;
    }
    if (parts.length === 2) break;
  }
  return parts.join(" ");
}

// Parameters as sent, key=value, in the order of the object the API gives.
function pairs(row) {
  const out = [];
  for (const [where, obj] of [["get", row._get], ["post", row._post]]) {
    if (obj && typeof obj === "object") {
      for (const k of Object.keys(obj)) out.push([where, k, obj[k]]);
    }
  }
  return out;
}

function isPixel(row) {
  const g = row._get || {};
  return Object.prototype.hasOwnProperty.call(g, "pixel") || Object.prototype.hasOwnProperty.call(g, "source");
}

function query(extra) {
  const f = view.filters;
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(f)) if (v !== "") q.set(k, v);
  q.set("timezone", timezone());
  q.set("limit", String(PAGE_SIZE));
  q.set("page", String(view.page));
  if (view.snapshot) q.set("snapshot", view.snapshot);
  for (const [k, v] of Object.entries(extra || {})) q.set(k, v);
  return q.toString();
}

function readFilters() {
  const form = $("filters");
  const f = {};
  for (const name of ["date_from", "date_to", "search", "response_status", "offer", "supplier", "partner", "clickid", "status", "goal", "action_id"]) {
    f[name] = form.elements[name].value.trim();
  }
  return f;
}

// Time buckets of a date range as the summary names them: hours for a range of up to two
// days, days beyond.
function buckets(from, to) {
  const days = [];
  for (let d = new Date(`${from}T00:00:00Z`); d <= new Date(`${to}T00:00:00Z`) && days.length < 400; d.setUTCDate(d.getUTCDate() + 1)) {
    days.push(d.toISOString().slice(0, 10));
  }
  if (days.length > 2) return { by: "day", keys: days };
  const keys = [];
  for (const day of days) for (let h = 0; h < 24; h++) keys.push(`${day} ${String(h).padStart(2, "0")}:00:00`);
  return { by: "hour", keys };
}

const SVG = "http://www.w3.org/2000/svg";
function svg(tag, attrs) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  return e;
}

// Stacked bars, accepted under rejected, one per bucket; each with its numbers as a tooltip.
function bars(target, keys, series, height) {
  const w = Math.max(2, Math.floor(600 / Math.max(1, keys.length)));
  target.setAttribute("viewBox", `0 0 ${w * keys.length} ${height}`);
  target.setAttribute("preserveAspectRatio", "none");
  const max = Math.max(1, ...keys.map((k) => (series[k] ? series[k].accepted + series[k].rejected : 0)));
  const parts = [];
  keys.forEach((k, i) => {
    const s = series[k] || { accepted: 0, rejected: 0 };
    const ha = (s.accepted / max) * height;
    const hr = (s.rejected / max) * height;
    const g = svg("g");
    g.append(svg("rect", { x: i * w, y: 0, width: w, height, class: "slot" }));
    if (ha > 0) g.append(svg("rect", { x: i * w + 0.5, y: height - ha, width: w - 1, height: ha, class: "accepted" }));
    if (hr > 0) g.append(svg("rect", { x: i * w + 0.5, y: height - ha - hr, width: w - 1, height: hr, class: "rejected" }));
    const t = svg("title");
    t.textContent = `${k}: ${s.accepted} accepted, ${s.rejected} rejected`;
    g.append(t);
    parts.push(g);
  });
  target.replaceChildren(...parts);
}

// Accepted and rejected postbacks within the list's filters, over its date range.
async function chart() {
  const f = view.filters;
  const { by, keys } = buckets(f.date_from, f.date_to);
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(f)) if (v !== "") q.set(k, v);
  q.set("timezone", timezone());
  q.set("group_by", `${by},response_status`);
  let body;
  try {
    body = await api(`/3.0/stats/serverpostbacks/summary?${q}`);
  } catch (_) {
    $("chart").replaceChildren();
    return;
  }
  const series = {};
  for (const r of body.summary || []) {
    const s = (series[r[by]] = series[r[by]] || { accepted: 0, rejected: 0 });
    s.accepted += r.accepted;
    s.rejected += r.rejected;
  }
  bars($("chart"), keys, series, 60);
}

// Integration health: per advertiser and offer, how many postbacks were refused and why, and
// how that went over the range; the most refused first.
const health = { loaded: false };
async function loadHealth() {
  health.loaded = true;
  $("health-error").textContent = "";
  const f = $("health-filters").elements;
  const range = { date_from: f.date_from.value, date_to: f.date_to.value, timezone: timezone() };
  const { by, keys } = buckets(range.date_from, range.date_to);
  let totals, trend, offers, advertisers;
  try {
    [totals, trend, offers, advertisers] = await Promise.all([
      api(`/3.0/stats/serverpostbacks/summary?${new URLSearchParams({ ...range, group_by: "advertiser,offer,error" })}`),
      api(`/3.0/stats/serverpostbacks/summary?${new URLSearchParams({ ...range, group_by: `advertiser,offer,${by}` })}`),
      api("/3.0/offers?limit=500"),
      api("/3.0/admin/advertisers?limit=500"),
    ]);
  } catch (e) {
    $("health-error").textContent = e.message;
    return;
  }
  const offerName = new Map((offers.offers || []).map((o) => [Number(o.id), o.title]));
  const advName = new Map((advertisers.advertisers || []).map((a) => [a.id, a.title]));
  const rows = new Map();
  const row = (r) => {
    const k = `${r.advertiser}|${r.offer}`;
    if (!rows.has(k)) rows.set(k, { advertiser: r.advertiser, offer: r.offer, postbacks: 0, accepted: 0, rejected: 0, errors: [], series: {} });
    return rows.get(k);
  };
  for (const r of totals.summary || []) {
    const x = row(r);
    x.postbacks += r.postbacks;
    x.accepted += r.accepted;
    x.rejected += r.rejected;
    if (r.error) x.errors.push([r.error, r.rejected]);
  }
  for (const r of trend.summary || []) {
    row(r).series[r[by]] = { accepted: r.accepted, rejected: r.rejected };
  }
  const sorted = [...rows.values()].sort((a, b) => b.rejected / b.postbacks - a.rejected / a.postbacks || b.postbacks - a.postbacks);
  $("health-rows").tBodies[0].replaceChildren(...sorted.map((x) => {
    const share = x.postbacks ? x.rejected / x.postbacks : 0;
    const tr = el("tr", null, share >= 0.2 ? "alert" : undefined);
    const errors = x.errors.sort((a, b) => b[1] - a[1]).slice(0, 3).map(([e, n]) => `${e} ×${n}`).join("; ");
    const spark = svg("svg", { class: "spark", role: "img", "aria-label": "over the range" });
    bars(spark, keys, x.series, 24);
    const trend = el("td");
    trend.append(spark);
    const adv = x.advertiser ? `${advName.get(x.advertiser) || ""} (${x.advertiser})` : "—";
    const offer = x.offer ? `${x.offer} · ${offerName.get(Number(x.offer)) || ""}` : "no click matched";
    tr.append(
      el("td", adv), el("td", offer), el("td", x.postbacks), el("td", x.accepted, "ok"),
      el("td", x.rejected, x.rejected ? "rejected" : ""), el("td", `${Math.round(share * 100)}%`),
      el("td", errors), trend,
    );
    return tr;
  }));
}

// Setup: advertisers, offers with a payment, partners, affiliate postback settings, and the
// links to hand to each side. Lists are re-read after every change.
const setup = { advertisers: [], offers: [], partners: [] };
async function loadSetup() {
  $("setup-error").textContent = "";
  let a, o, p, s;
  try {
    [a, o, p, s] = await Promise.all([
      api("/3.0/admin/advertisers?limit=500"), api("/3.0/offers?limit=500"),
      api("/3.0/admin/partners?limit=500"), api("/3.0/admin/postbacks?limit=500"),
    ]);
  } catch (e) {
    $("setup-error").textContent = e.message;
    return;
  }
  setup.advertisers = a.advertisers || [];
  setup.offers = o.offers || [];
  setup.partners = p.partners || [];
  const rows = (id, items, cells) => $(id).tBodies[0].replaceChildren(...items.map((x) => {
    const tr = el("tr");
    tr.append(...cells(x).map((c) => el("td", c)));
    return tr;
  }));
  rows("adv-list", setup.advertisers, (x) => [x.id, x.title, x.secure ? "set" : "—", x.allowed_ip || "any"]);
  const advTitle = new Map(setup.advertisers.map((x) => [x.id, x.title]));
  rows("offer-list", setup.offers, (x) => [
    x.id, x.title, x.advertiser ? advTitle.get(x.advertiser) || x.advertiser : "—", x.status,
    (x.payments || []).map((m) => `${m.goal}: ${m.total}${m.type === "percent" ? "%" : ` ${m.currency}`}`).join(", "),
  ]);
  rows("partner-list", setup.partners, (x) => [x.id, x.email, x.login]);
  rows("setting-list", s.postbacks || [], (x) => [
    x.id, x.partner_id, x.offer_id || "every", x.goal || "any", x.status || "every change", x.method, x.url,
  ]);
  const options = (select, items, label, keepFirst) => {
    const before = select.value;
    const first = keepFirst ? [select.options[0]] : [];
    select.replaceChildren(...first, ...items.map((x) => {
      const opt = el("option", label(x));
      opt.value = String(x.id);
      return opt;
    }));
    if ([...select.options].some((opt) => opt.value === before)) select.value = before;
  };
  options($("offer-form").elements.advertiser, setup.advertisers, (x) => x.title, true);
  options($("setting-form").elements.partner_id, setup.partners, (x) => `${x.id} · ${x.email}`, false);
  options($("setting-form").elements.offer_id, setup.offers, (x) => `${x.id} · ${x.title}`, true);
  options($("links-form").elements.offer, setup.offers, (x) => `${x.id} · ${x.title}`, false);
  options($("links-form").elements.partner, setup.partners, (x) => `${x.id} · ${x.email}`, false);
  links();
}

// The links for the offer and partner chosen: the partner's tracking link, and the
// advertiser's postback URL and pixel (with the secure code the offer or its advertiser needs).
function links() {
  const f = $("links-form").elements;
  const offer = setup.offers.find((x) => String(x.id) === f.offer.value);
  const base = location.origin;
  if (!offer) {
    for (const id of ["link-click", "link-postback", "link-pixel"]) $(id).textContent = "Create an offer first.";
    return;
  }
  const adv = setup.advertisers.find((x) => x.id === offer.advertiser);
  const secure = offer.secure || (adv && adv.secure) || "";
  const goal = (offer.payments && offer.payments[0] && offer.payments[0].goal) || "1";
  const s2s = new URLSearchParams({ clickid: "{clickid}", action_id: "{order_id}", goal, sum: "{sum}" });
  const pixel = new URLSearchParams({ offer_id: String(offer.id), afid: "{order_id}", afgoal: goal, afprice: "{sum}" });
  if (secure) {
    s2s.set("secure", secure);
    pixel.set("afsecure", secure);
  }
  const braces = (q) => q.toString().replace(/%7B/g, "{").replace(/%7D/g, "}");
  $("link-click").textContent = `${base}/click?offer_id=${offer.id}&pid=${f.partner.value || "PARTNER_ID"}`;
  $("link-postback").textContent = `${base}/postback?${braces(s2s)}`;
  $("link-pixel").textContent = `<img src="${base}/success.jpg?${braces(pixel)}" width="1" height="1" alt="">`;
}

async function copy(button) {
  const text = $(button.dataset.copy).textContent;
  try {
    await navigator.clipboard.writeText(text);
    button.textContent = "Copied";
  } catch (_) {
    // No clipboard (an insecure origin): select it for the operator to copy.
    const range = document.createRange();
    range.selectNodeContents($(button.dataset.copy));
    const sel = getSelection();
    sel.removeAllRanges();
    sel.addRange(range);
    button.textContent = "Selected: copy it";
  }
  setTimeout(() => { button.textContent = "Copy"; }, 3000);
}

// Sends a setup form to its admin endpoint; blank fields are left out.
async function create(path, fields, what) {
  $("setup-message").textContent = "";
  $("setup-error").textContent = "";
  const form = {};
  for (const [k, v] of Object.entries(fields)) if (String(v).trim() !== "") form[k] = String(v).trim();
  try {
    const body = await api(path, form);
    const made = body.advertiser || body.offer || body.partner || body.postback || {};
    $("setup-message").textContent = `Created ${what} ${made.id}.`;
    await loadSetup();
    return true;
  } catch (e) {
    $("setup-error").textContent = `${what}: ${e.message}`;
    return false;
  }
}

function bindSetup() {
  const on = (id, make) => $(id).addEventListener("submit", async (e) => {
    e.preventDefault();
    if (await make(e.target.elements)) e.target.reset();
  });
  on("adv-form", (f) => create("/3.0/admin/advertiser", { title: f.title.value, secure: f.secure.value, allowed_ip: f.allowed_ip.value }, "advertiser"));
  on("offer-form", async (f) => {
    const fields = {
      title: f.title.value, advertiser: f.advertiser.value, url: f.url.value, status: f.status.value,
      default_status: f.default_status.value,
    };
    // One payment per fieldset, as Affise's payments[i][...] keys.
    $("offer-form").querySelectorAll("fieldset.payment").forEach((set, i) => {
      for (const input of set.querySelectorAll("input, select")) fields[`payments[${i}][${input.name}]`] = input.value;
    });
    const made = await create("/3.0/admin/offer", fields, "offer");
    if (made) $("offer-form").querySelectorAll("fieldset.payment").forEach((set, i) => { if (i > 0) set.remove(); });
    return made;
  });
  $("add-payment").addEventListener("click", () => {
    const sets = $("offer-form").querySelectorAll("fieldset.payment");
    const next = sets[sets.length - 1].cloneNode(true);
    for (const input of next.querySelectorAll("input")) input.value = input.name === "currency" ? "USD" : "";
    sets[sets.length - 1].after(next);
  });
  on("partner-form", (f) => create("/3.0/admin/partner", { email: f.email.value, login: f.login.value }, "partner"));
  on("setting-form", (f) => create("/3.0/partner/postback", {
    partner_id: f.partner_id.value, offer_id: f.offer_id.value, goal: f.goal.value, status: f.status.value,
    method: f.method.value, url: f.url.value,
  }, "postback"));
  $("links-form").addEventListener("change", links);
  for (const b of document.querySelectorAll("[data-copy]")) b.addEventListener("click", () => copy(b));
}

async function load() {
  $("list-error").textContent = "";
  let body;
  try {
    body = await api(`/3.0/stats/serverpostbacks?${query()}`);
  } catch (e) {
    if (e.status === 401 || e.status === 403) return signOut("The key was refused; sign in again.");
    $("list-error").textContent = e.message;
    return;
  }
  const p = body.pagination || {};
  view.snapshot = p.snapshot || view.snapshot;
  view.rows = body.postbacks || [];
  render(view.rows);
  const total = Number(p.total_count || 0);
  view.total = total;
  const first = total === 0 ? 0 : (view.page - 1) * PAGE_SIZE + 1;
  const last = Math.min(total, view.page * PAGE_SIZE);
  $("summary").textContent = `${total} postbacks` + (total ? ` · showing ${first}–${last}` : "");
  $("page").textContent = `page ${view.page}`;
  $("prev").disabled = view.page <= 1;
  $("next").disabled = last >= total;
  if (view.page === 1) chart();
}

function render(rows, fresh) {
  const tbody = $("rows").tBodies[0];
  tbody.replaceChildren();
  rows.forEach((r, i) => {
    const tr = el("tr", null, i < (fresh || 0) ? "new" : undefined);
    tr.tabIndex = 0;
    tr.dataset.index = String(i);
    const date = new Date(Number(r.date.sec) * 1000 + Math.floor(Number(r.date.usec) / 1000));
    const track = r.track || {};
    const offer = track.offer && track.offer.title ? `${r.offer_id} · ${track.offer.title}` : (r.offer_id || "");
    const params = el("td", pairs(r).map(([, k, v]) => `${k}=${v}`).join("  "), "params");
    const ok = Number(r.response_status) === 1;
    const response = el("td", ok ? "OK" : r.error, ok ? "ok" : "rejected");
    const cells = [
      el("td", date.toLocaleString()),
      el("td", offer),
      el("td", r.advertiser_id),
      el("td", r.pid || ""),
      el("td", r.clickid),
      el("td", r.status || ""),
      el("td", r.goal),
      el("td", r.action_id),
      el("td", r.ip),
      el("td", human(r.delta)),
      params,
      response,
    ];
    if (isPixel(r)) cells[10].prepend(el("span", "pixel", "mark"), " ");
    tr.append(...cells);
    tbody.append(tr);
  });
}

function openDetail(row) {
  const ok = Number(row.response_status) === 1;
  $("detail-response").textContent = ok ? "Accepted (status 1)" : `Rejected (status 2): ${row.error}`;
  $("detail-response").className = ok ? "ok" : "rejected";
  const tbody = $("detail-params").tBodies[0];
  tbody.replaceChildren();
  for (const [where, k, v] of pairs(row)) {
    const tr = el("tr");
    tr.append(el("td", where), el("td", k), el("td", v));
    tbody.append(tr);
  }
  $("detail").showModal();
  explain(row);
}

// The filtered rows as CSV, from the engine's streamed export (fetched with the key as a
// header, then saved from memory).
async function exportCsv() {
  $("list-error").textContent = "";
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(readFilters())) if (v !== "") q.set(k, v);
  q.set("timezone", timezone());
  try {
    const r = await fetch(`/3.0/stats/serverpostbacks/csv?${q}`, { headers: { "API-Key": sessionStorage.getItem(KEY) || "" } });
    if (!r.ok) throw new Error(`${r.status}: ${r.statusText}`);
    const blob = await r.blob();
    const a = el("a");
    a.href = URL.createObjectURL(blob);
    a.download = `serverpostbacks-${q.get("date_from") || today()}.csv`;
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(a.href), 60000);
  } catch (e) {
    $("list-error").textContent = `Export failed: ${e.message}`;
  }
}

const RULES = {
  secure_code: "Secure code", ip_allow_list: "IP allow-list", click_id: "Click id", click: "Click",
  offer: "Offer", goal: "Goal", status: "Status", sum: "Sum", dedupe: "Dedupe",
};

// The engine's explanation of one postback: each rule it applied, in order, passed or not,
// and why; a conversion the dedupe found opens in the Conversions tab.
async function explain(row) {
  const list = $("why");
  list.replaceChildren(el("li", "…"));
  $("why-note").textContent = "";
  let body;
  try {
    body = await api(`/3.0/stats/serverpostbacks/${encodeURIComponent(row._id.$id)}/explanation?timezone=${encodeURIComponent(timezone())}`);
  } catch (e) {
    list.replaceChildren(el("li", e.message, "error"));
    return;
  }
  list.replaceChildren(...(body.checks || []).map((c) => {
    const li = el("li", null, c.passed ? "ok" : "rejected");
    li.dataset.rule = c.rule;
    li.append(el("strong", `${c.passed ? "✓" : "✗"} ${RULES[c.rule] || c.rule}: `), el("span", c.detail));
    if (c.conversion_id) {
      const b = el("button", "Open conversion");
      b.type = "button";
      b.addEventListener("click", () => {
        $("detail").close();
        const f = $("conv-filters").elements;
        for (const input of f) if (input.name && input.name !== "date_from" && input.name !== "date_to") input.value = "";
        // The conversion is the postback's or older, within the retention (92 days).
        const at = Number(row.date.sec) * 1000;
        f.date_from.value = localDay(at - 92 * 86400000);
        f.date_to.value = localDay(at);
        f.offer.value = row.offer_id || "";
        f.action_id.value = row.action_id || row.clickid || ""; // the action id defaults to the click id
        tab("conversions");
        conversions.start();
      });
      li.append(" ", b);
    }
    return li;
  }));
  $("why-note").textContent = body.note || "";
}

// Live mode: new postbacks matching the filters, pushed by the engine as server-sent events
// (read with fetch, so the key stays a header). On the first page they appear at the top; on
// another page, or with a postback open, they wait behind a button, so the operator's place
// is kept.
function liveOn() {
  liveOff();
  const controller = new AbortController();
  view.live = controller;
  $("live").setAttribute("aria-pressed", "true");
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(view.filters)) {
    if (v !== "" && k !== "date_from" && k !== "date_to") q.set(k, v);
  }
  q.set("timezone", timezone());
  const connect = async () => {
    while (view.live === controller) {
      try {
        const r = await fetch(`/3.0/stats/serverpostbacks/live?${q}`, {
          headers: { "API-Key": sessionStorage.getItem(KEY) || "" },
          signal: controller.signal,
        });
        if (r.status === 401 || r.status === 403) return signOut("The key was refused; sign in again.");
        const reader = r.body.getReader();
        const decoder = new TextDecoder();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += decoder.decode(value, { stream: true });
          let cut;
          while ((cut = buffer.indexOf("\n\n")) >= 0) {
            event(buffer.slice(0, cut));
            buffer = buffer.slice(cut + 2);
          }
        }
      } catch (e) {
        if (controller.signal.aborted) return;
      }
      await new Promise((done) => setTimeout(done, 2000));
    }
  };
  connect();
}

function liveOff() {
  if (view.live) view.live.abort();
  view.live = null;
  delete $("live").dataset.state;
  $("live").setAttribute("aria-pressed", "false");
}

function event(text) {
  // The stream says it is following once it has marked the rows already there.
  if (text.split("\n").includes(": live")) $("live").dataset.state = "following";
  let name = "message";
  const data = [];
  for (const line of text.split("\n")) {
    if (line.startsWith("event:")) name = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
  }
  if (name !== "postback" || data.length === 0) return;
  let row;
  try { row = JSON.parse(data.join("\n")); } catch (_) { return; }
  view.news.unshift(row);
  if (view.page === 1 && !$("detail").open) showNews();
  else {
    $("news").hidden = false;
    $("show-news").textContent = `${view.news.length} new postback${view.news.length === 1 ? "" : "s"} — show`;
  }
}

function showNews() {
  const fresh = view.news.length;
  view.rows = view.news.concat(view.rows).slice(0, PAGE_SIZE);
  view.total += fresh;
  view.news = [];
  $("news").hidden = true;
  render(view.rows, fresh);
  const last = Math.min(view.total, PAGE_SIZE);
  $("summary").textContent = `${view.total} postbacks` + (view.total ? ` · showing 1–${last}` : "");
}

function show(signedIn) {
  $("sign-in").hidden = signedIn;
  $("nav").hidden = !signedIn;
  $("sign-out").hidden = !signedIn;
  if (signedIn) tab("server");
  else for (const section of Object.values(TABS)) $(section).hidden = true;
}

const TABS = { server: "postbacks", affiliate: "affiliates", conversions: "conversions", health: "health", setup: "setup" };

function tab(name) {
  for (const [t, section] of Object.entries(TABS)) {
    $(section).hidden = t !== name;
    if (t === name) $(`tab-${t}`).setAttribute("aria-current", "page");
    else $(`tab-${t}`).removeAttribute("aria-current");
  }
  const list = { affiliate: affiliates, conversions }[name];
  if (list && !list.filters) list.start();
  if (name === "health" && !health.loaded) loadHealth();
  if (name === "setup") loadSetup();
}

// A paged listing of one /3.0/stats endpoint with the filters of its form; element ids start
// with `prefix`. `row` turns one item into a table row.
class List {
  constructor(prefix, path, key, noun, row) {
    Object.assign(this, { prefix, path, key, noun, row, page: 1, snapshot: null, filters: null });
  }

  part(name) {
    return $(`${this.prefix}-${name}`);
  }

  bind() {
    const form = this.part("filters");
    form.elements.date_from.value = today();
    form.elements.date_to.value = today();
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      this.start();
    });
    this.part("prev").addEventListener("click", () => { this.page -= 1; this.load(); });
    this.part("next").addEventListener("click", () => { this.page += 1; this.load(); });
  }

  start() {
    this.filters = {};
    for (const input of this.part("filters").elements) {
      if (input.name) this.filters[input.name] = input.value.trim();
    }
    this.page = 1;
    this.snapshot = null;
    this.load();
  }

  async load() {
    this.part("error").textContent = "";
    const q = new URLSearchParams();
    for (const [k, v] of Object.entries(this.filters)) if (v !== "") q.set(k, v);
    q.set("timezone", timezone());
    q.set("limit", String(PAGE_SIZE));
    q.set("page", String(this.page));
    if (this.snapshot) q.set("snapshot", this.snapshot);
    let body;
    try {
      body = await api(`${this.path}?${q}`);
    } catch (e) {
      if (e.status === 401 || e.status === 403) return signOut("The key was refused; sign in again.");
      this.part("error").textContent = e.message;
      return;
    }
    const p = body.pagination || {};
    this.snapshot = p.snapshot || this.snapshot;
    this.part("rows").tBodies[0].replaceChildren(...(body[this.key] || []).map(this.row));
    const total = Number(p.total_count || 0);
    const first = total === 0 ? 0 : (this.page - 1) * PAGE_SIZE + 1;
    const last = Math.min(total, this.page * PAGE_SIZE);
    this.part("summary").textContent = `${total} ${this.noun}` + (total ? ` · showing ${first}–${last}` : "");
    this.part("page").textContent = `page ${this.page}`;
    this.part("prev").disabled = this.page <= 1;
    this.part("next").disabled = last >= total;
  }
}

function dateOf(d) {
  return new Date(Number(d.sec) * 1000 + Math.floor(Number(d.usec) / 1000)).toLocaleString();
}

// Affiliates Postbacks: one row per delivery attempt, and re-sends of failed deliveries.
const affiliates = new List("aff", "/3.0/stats/affiliatepostbacks", "postbacks", "attempts", (r) => {
  const tr = el("tr");
  const url = el("td", null, "url");
  // A link only for http(s): the URL is an affiliate's, macros filled from postbacks.
  if (/^https?:\/\//i.test(r.postback_url || "")) {
    const a = el("a", r.postback_url);
    a.href = r.postback_url;
    a.rel = "noopener noreferrer nofollow";
    a.target = "_blank";
    url.append(a);
  } else {
    url.textContent = r.postback_url || "";
  }
  const failed = r.state === "failed" || r.state === "gave_up";
  const action = el("td");
  if (failed) {
    const b = el("button", "Re-send");
    b.type = "button";
    b.addEventListener("click", () => resend({ job_id: r.job_id }));
    action.append(b);
  }
  tr.append(
    el("td", dateOf(r.date)), url, el("td", r.lead_id), el("td", r.pid), el("td", r.offer_id),
    el("td", r.goal), el("td", r.status), el("td", r.payouts), el("td", r.revenue), el("td", r.currency),
    el("td", r.notice), el("td", r.http_code === 0 ? "—" : r.http_code), el("td", r.error, r.error ? "rejected" : ""),
    el("td", r.integration_type), el("td", r.attempt), el("td", r.state, failed ? "rejected" : r.state === "delivered" ? "ok" : ""),
    action,
  );
  return tr;
});

// Conversions, with their filters.
const conversions = new List("conv", "/3.0/stats/conversions", "conversions", "conversions", (c) => {
  const tr = el("tr");
  tr.append(
    el("td", c.created_at), el("td", c.id), el("td", c.action_id), el("td", c.clickid),
    el("td", c.offer && c.offer.title ? `${c.offer_id} · ${c.offer.title}` : c.offer_id),
    el("td", c.partner && c.partner.email ? `${c.partner_id} · ${c.partner.email}` : c.partner_id),
    el("td", c.advertiser && c.advertiser.title ? c.advertiser.title : c.supplier_id),
    el("td", c.goal), el("td", c.status), el("td", c.sum), el("td", c.payouts), el("td", c.revenue),
    el("td", c.currency), el("td", c.sub1), el("td", c.comment), el("td", c.ip), el("td", c.updated_at),
  );
  return tr;
});

async function resend(form) {
  $("aff-message").textContent = "";
  $("aff-error").textContent = "";
  try {
    const body = await api("/3.0/admin/affiliatepostbacks/resend", form);
    $("aff-message").textContent = `Re-sent ${body.count} deliver${body.count === 1 ? "y" : "ies"}.`;
  } catch (e) {
    $("aff-error").textContent = e.message;
  }
}


function signOut(message) {
  liveOff();
  affiliates.filters = null;
  conversions.filters = null;
  health.loaded = false;
  sessionStorage.removeItem(KEY);
  show(false);
  $("sign-in-error").textContent = message || "";
}

async function signIn(key) {
  sessionStorage.setItem(KEY, key);
  try {
    await api(`/3.0/stats/serverpostbacks?limit=1&date_from=${today()}&date_to=${today()}`);
  } catch (e) {
    return signOut(e.status === 401 || e.status === 403 ? "That key is not valid." : e.message);
  }
  $("sign-in-error").textContent = "";
  show(true);
  startList();
}

function startList() {
  view.filters = readFilters();
  view.page = 1;
  view.snapshot = null;
  view.news = [];
  $("news").hidden = true;
  load();
  if (view.live) liveOn();
}

document.addEventListener("DOMContentLoaded", () => {
  const form = $("filters");
  form.elements.date_from.value = today();
  form.elements.date_to.value = today();
  affiliates.bind();
  conversions.bind();
  bindSetup();
  const hf = $("health-filters");
  hf.elements.date_from.value = today();
  hf.elements.date_to.value = today();
  hf.addEventListener("submit", (e) => {
    e.preventDefault();
    loadHealth();
  });
  for (const t of Object.keys(TABS)) $(`tab-${t}`).addEventListener("click", () => tab(t));
  const affForm = $("aff-filters");
  $("aff-resend-all").addEventListener("click", () => {
    const partner = affForm.elements.partner.value.trim();
    if (!partner) {
      $("aff-error").textContent = "Choose an affiliate first: all its failed deliveries in the date range are re-sent.";
      return;
    }
    resend({ partner_id: partner, date_from: affForm.elements.date_from.value, date_to: affForm.elements.date_to.value, timezone: timezone() });
  });
  // The test preview of a postback setting: the URL it would call for a conversion, not sent.
  $("preview").addEventListener("submit", async (e) => {
    e.preventDefault();
    const f = e.target.elements;
    const id = encodeURIComponent(f.setting.value.trim());
    const q = new URLSearchParams({ conversion_id: f.conversion_id.value.trim() });
    try {
      const body = await api(`/3.0/partner/postback/${id}/test?${q}`);
      const p = body.postback || {};
      $("preview-url").textContent = `${p.method} ${p.url}` + (p.matches_conversion ? "" : " (this setting would not fire for this conversion)");
    } catch (err) {
      $("preview-url").textContent = err.message;
    }
  });
  $("sign-in-form").addEventListener("submit", (e) => {
    e.preventDefault();
    signIn($("api-key").value.trim());
  });
  $("sign-out").addEventListener("click", () => signOut(""));
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    startList();
  });
  $("live").addEventListener("click", () => (view.live ? liveOff() : liveOn()));
  $("export").addEventListener("click", exportCsv);
  $("show-news").addEventListener("click", () => {
    // New rows go on the first page of the list as it is now.
    view.page = 1;
    view.snapshot = null;
    view.news = [];
    $("news").hidden = true;
    load();
  });
  $("prev").addEventListener("click", () => { view.page -= 1; load(); });
  $("next").addEventListener("click", () => { view.page += 1; load(); });
  const tbody = $("rows").tBodies[0];
  const pick = (e) => {
    const tr = e.target.closest("tr");
    if (tr && tr.dataset.index) openDetail(view.rows[Number(tr.dataset.index)]);
  };
  tbody.addEventListener("click", pick);
  tbody.addEventListener("keydown", (e) => {
    if (e.key === "Enter") {
      // Not also to the dialog's first button, which has the focus once it opens.
      e.preventDefault();
      pick(e);
    }
    const tr = e.target.closest("tr");
    const next = e.key === "ArrowDown" ? tr && tr.nextElementSibling : e.key === "ArrowUp" ? tr && tr.previousElementSibling : null;
    if (next) {
      e.preventDefault();
      next.focus();
    }
  });
  // "/" goes to the search box, as in most log viewers.
  document.addEventListener("keydown", (e) => {
    const typing = e.target.closest && e.target.closest("input, select, textarea");
    if (e.key === "/" && !typing && !$("postbacks").hidden) {
      e.preventDefault();
      $("filters").elements.search.focus();
    }
  });
  if (sessionStorage.getItem(KEY)) {
    show(true);
    startList();
  } else {
    show(false);
  }
});
