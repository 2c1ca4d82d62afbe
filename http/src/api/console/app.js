// fleetgate's operator console. Plain JavaScript, no build step: the
// server sends this file as it is. Everything shown is set as text (never
// as HTML), and every state change carries the session's CSRF token.

let me = null;
let activity = null; // the EventSource while a view shows live activity

const view = document.getElementById("view");

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null) continue;
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

const svgNs = "http://www.w3.org/2000/svg";
function svg(tag, attrs = {}) {
  const e = document.createElementNS(svgNs, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  return e;
}

async function api(path, options = {}) {
  const init = { credentials: "same-origin", headers: {} , ...options };
  if (init.method && init.method !== "GET") {
    init.headers["X-CSRF-Token"] = me ? me.csrf : "";
    if (init.body !== undefined) init.headers["Content-Type"] = "application/json";
  }
  const r = await fetch(path, init);
  if (r.status === 401) {
    signedOut();
    throw new Error("signed out");
  }
  const text = await r.text();
  const body = text ? JSON.parse(text) : null;
  if (!r.ok) throw new Error(body && body.error ? body.error.message : `HTTP ${r.status}`);
  return body;
}

function signedOut() {
  stopActivity();
  view.replaceChildren(
    el("div", { class: "panel" },
      el("h1", { id: "signed-out", text: "Signed out" }),
      el("p", {}, "Run ", el("code", { text: "fleetgate console login" }), " and open the link it prints.")));
}

function badge(status) {
  return el("span", { class: `badge ${status}`, text: status });
}

function when(s) {
  if (!s) return "";
  const d = new Date(s);
  return isNaN(d) ? s : d.toLocaleString();
}

// A table in a region that scrolls sideways on a narrow screen (and can
// be scrolled from the keyboard).
function table(headers, rows, attrs = {}) {
  return el("div", { class: "table-wrap", tabindex: "0", role: "region", "aria-label": attrs.id ? `${attrs.id} table` : "table" },
    el("table", attrs,
      el("thead", {}, el("tr", {}, headers.map((h) => h ? el("th", { text: h }) : el("td", {})))),
      el("tbody", {}, rows)));
}

function card(label, value, id, href) {
  const inner = [
    el("div", { class: "label", text: label }),
    el("div", { class: "value", id, text: String(value) })];
  // A card that stands for a list opens it.
  return href
    ? el("a", { class: "card link", href, "aria-label": `${label}: ${value}, open the list` }, inner)
    : el("div", { class: "card" }, inner);
}

function stopActivity() {
  if (activity) {
    activity.close();
    activity = null;
  }
}

// Live activity into `list` (newest on top).
function follow(list, limit = 200) {
  stopActivity();
  activity = new EventSource("/console/api/activity");
  activity.addEventListener("activity", (e) => {
    const a = JSON.parse(e.data);
    const at = new Date(a.at);
    list.prepend(el("li", { class: "event" },
      el("span", { class: "muted", text: at.toLocaleTimeString() }),
      el("span", { class: `kind-${a.kind}`, text: a.kind }),
      el("span", {}, el("span", { text: a.message + " " }), el("span", { class: "mono", text: a.detail }))));
    while (list.children.length > limit) list.lastChild.remove();
  });
}

function chart(series, step) {
  // Bars stretch to the panel (no aspect ratio to keep); labels are HTML.
  const w = 1000, h = 160;
  const s = svg("svg", { viewBox: `0 0 ${w} ${h}`, preserveAspectRatio: "none", role: "img", "aria-label": "connects and refusals over the last hour" });
  const max = Math.max(1, ...series.map(([, c, r]) => Math.max(c, r)));
  const n = Math.max(series.length, Math.floor(3600 / step));
  const bw = w / n;
  s.append(svg("line", { x1: 0, y1: h - 0.5, x2: w, y2: h - 0.5, class: "axis" }));
  series.forEach(([, c, r], i) => {
    const x = w - (series.length - i) * bw;
    const ch = (c / max) * (h - 4), rh = (r / max) * (h - 4);
    s.append(svg("rect", { x, y: h - ch, width: bw * 0.45, height: ch, class: "connects" }));
    s.append(svg("rect", { x: x + bw * 0.5, y: h - rh, width: bw * 0.45, height: rh, class: "refusals" }));
  });
  return el("div", { class: "chart" },
    el("div", { class: "muted scale", text: `highest: ${max} in ${step} s` }),
    s,
    el("div", { class: "axis-labels muted" }, el("span", { text: "1 hour ago" }), el("span", { text: "30 min" }), el("span", { text: "now" })),
    el("div", { class: "legend" },
      el("span", {}, el("span", { class: "swatch connects" }), "connects"),
      el("span", {}, el("span", { class: "swatch refusals" }), "refusals")));
}

async function overview() {
  const o = await api("/console/api/overview");
  const counts = Object.fromEntries(o.counts.by_status);
  const refusals = Object.entries(o.refusals).filter(([, n]) => n > 0);
  const feed = el("ul", { class: "feed", id: "activity", tabindex: "0", "aria-label": "live activity" });
  view.replaceChildren(
    el("h1", { text: "Overview" }),
    el("div", { class: "grid" },
      card("devices", o.devices, "count-devices"),
      card("active", counts.active || 0, "count-active", "#/devices?status=active"),
      card("suspended", counts.suspended || 0, "count-suspended", "#/devices?status=suspended"),
      card("revoked", counts.revoked || 0, "count-revoked", "#/devices?status=revoked"),
      card("pending", counts.pending || 0, "count-pending", "#/devices?status=pending"),
      card("live sessions", o.live_sessions, "live-sessions"),
      card("handshakes", o.handshakes, "handshakes"),
      card("connections cut", o.kicked, "kicked")),
    el("div", { class: "panel" }, el("h2", { text: "Connects and refusals, last hour" }), chart(o.series, o.series_step_s)),
    el("div", { class: "two" },
      el("div", { class: "panel" }, el("h2", { text: "Refusals by reason" }),
        refusals.length
          ? table(["reason", "count"], refusals.map(([r, n]) => el("tr", {}, el("td", { text: r }), el("td", { text: String(n) }))), { id: "refusals" })
          : el("p", { class: "muted", text: "None since the server started." })),
      el("div", { class: "panel" }, el("h2", { text: "Manufacturers" }),
        o.counts.manufacturers.length
          ? table(["name", "status", "devices"], o.counts.manufacturers.map((m) =>
            el("tr", {}, el("td", {}, el("a", { href: `#/manufacturers/${encodeURIComponent(m.name)}`, text: m.name })), el("td", {}, badge(m.status)), el("td", { text: String(m.devices) }))), { id: "manufacturers-table" })
          : el("p", { class: "muted", text: "No manufacturers yet." }))),
    el("div", { class: "panel" }, el("h2", { text: "Live activity" }), feed));
  follow(feed, 20);
}

const ROLES = [["device", "devices"], ["service", "services"], ["admin", "admins"], ["claim", "claims"], ["node", "nodes"], ["", "every role"]];

async function devices(params) {
  const q = params.get("q") || "";
  const status = params.get("status") || "";
  // Devices unless asked otherwise: services, admins and claims apart.
  const role = params.has("role") ? params.get("role") : "device";
  const connected = params.get("connected") === "true";
  const expiring = params.get("expiring") || "";
  const after = params.get("after") || "";
  const trail = (params.get("trail") || "").split(",").filter(Boolean);
  const qs = new URLSearchParams({ q, status, role });
  if (connected) qs.set("connected", "true");
  if (expiring) qs.set("expiring", expiring);
  if (after) qs.set("after", after);
  const page = await api(`/console/api/devices?${qs}`);
  const search = el("input", { type: "search", id: "search", placeholder: "Search by id or manufacturer", value: q });
  const pick = el("select", { id: "status-filter" },
    ["", "active", "suspended", "revoked", "pending"].map((s) => {
      const o = el("option", { value: s, text: s || "any status" });
      if (s === status) o.selected = true;
      return o;
    }));
  const rolePick = el("select", { id: "role-filter" },
    ROLES.map(([r, label]) => {
      const o = el("option", { value: r, text: label });
      if (r === role) o.selected = true;
      return o;
    }));
  const onlyConnected = el("input", { type: "checkbox", id: "connected-filter" });
  onlyConnected.checked = connected;
  // Active devices whose certificates all expire soon, soonest first.
  const expiringPick = el("select", { id: "expiring-filter" },
    [["", "any expiry"], ["7", "expiring in 7 days"], ["30", "expiring in 30 days"], ["90", "expiring in 90 days"]].map(([v, label]) => {
      const o = el("option", { value: v, text: label });
      if (v === expiring) o.selected = true;
      return o;
    }));
  const go = (extra = {}) => {
    const p = new URLSearchParams({ q: search.value, status: pick.value, role: rolePick.value, ...extra });
    if (onlyConnected.checked) p.set("connected", "true");
    if (expiringPick.value) p.set("expiring", expiringPick.value);
    location.hash = `#/devices?${p}`;
  };
  search.addEventListener("keydown", (e) => { if (e.key === "Enter") go(); });
  pick.addEventListener("change", () => go());
  rolePick.addEventListener("change", () => go());
  onlyConnected.addEventListener("change", () => go());
  expiringPick.addEventListener("change", () => go());
  // Pending devices can be approved here, some or all of the page at once.
  const pending = page.items.filter((d) => d.status === "pending");
  const picks = new Map(pending.map((d) => [d.id, el("input", { type: "checkbox", class: "pick", "aria-label": `select ${d.id}`, "data-pick": d.id })]));
  const approve = async (ids) => {
    if (!ids.length) return;
    const ok = await confirmAction(`Approve ${ids.length} device${ids.length === 1 ? "" : "s"}?`,
      "Approved devices may connect with their certificates.", false);
    if (!ok) return;
    try {
      const r = await api("/console/api/approve", { method: "POST", body: JSON.stringify({ ids }) });
      await devices(params);
      const note = `Approved ${r.approved.length}` + (r.refused.length ? `; not approved: ${r.refused.map(([i, why]) => `${i} (${why})`).join(", ")}` : "");
      view.prepend(el("p", { class: r.refused.length ? "error" : "note", id: "approve-result", text: note }));
    } catch (e) {
      view.prepend(el("p", { class: "error", id: "action-error", text: e.message }));
    }
  };
  const rows = page.items.map((d) =>
    el("tr", { "data-device": d.id },
      pending.length ? el("td", {}, picks.get(d.id) || null) : null,
      el("td", {}, el("a", { href: `#/devices/${encodeURIComponent(d.id)}`, text: d.id })),
      el("td", {}, badge(d.status)),
      el("td", { text: d.role }),
      el("td", { text: d.manufacturer || "—" }),
      el("td", { text: d.expires ? when(d.expires) : "—" }),
      el("td", { class: "seen", text: d.connected ? "now" : d.last_seen ? when(d.last_seen) : "never" }),
      el("td", { title: d.nodes.join(", ") }, el("span", { class: d.connected ? "dot on" : "dot" }),
        d.connected ? `connected: ${d.nodes.join(", ")}` : "offline")));
  const pageOf = (a, t) => go({ ...(a ? { after: a } : {}), ...(t.length ? { trail: t.join(",") } : {}) });
  view.replaceChildren(
    el("h1", { text: "Devices" }),
    page.total !== null && page.total !== undefined
      ? el("p", { class: "muted", id: "devices-total", text: `${page.total} in the registry, every role.` })
      : null,
    el("div", { class: "toolbar" },
      el("label", { for: "search", class: "sr-only", text: "Search devices" }), search,
      el("label", { for: "status-filter", class: "sr-only", text: "Status" }), pick,
      el("label", { for: "role-filter", class: "sr-only", text: "Role" }), rolePick,
      el("label", { for: "expiring-filter", class: "sr-only", text: "Certificate expiry" }), expiringPick,
      el("label", { class: "check" }, onlyConnected, "connected"),
      el("button", { type: "button", onclick: () => go(), text: "Search" })),
    pending.length
      ? el("div", { class: "toolbar" },
        el("button", { type: "button", id: "approve-selected", onclick: () => approve([...picks].filter(([, c]) => c.checked).map(([i]) => i)), text: "Approve selected" }),
        el("button", { type: "button", id: "approve-page", class: "quiet", onclick: () => approve([...picks.keys()]), text: `Approve all ${pending.length} on this page` }))
      : null,
    el("div", { class: "panel" },
      rows.length ? table([...(pending.length ? [""] : []), "id", "status", "role", "manufacturer", "certificate until", "last seen", "connection"], rows, { id: "devices" }) : el("p", { class: "muted", text: "No devices match." }),
      el("div", { class: "toolbar" },
        after ? el("button", { type: "button", class: "quiet", id: "previous-page", onclick: () => pageOf(trail[trail.length - 1], trail.slice(0, -1)), text: "Previous page" }) : null,
        after ? el("button", { type: "button", class: "quiet", onclick: () => go(), text: "First page" }) : null,
        page.next ? el("button", { type: "button", id: "next-page", onclick: () => pageOf(page.next, after ? [...trail, after] : trail), text: "Next page" }) : null)));
}

function confirmAction(title, text, withReason) {
  const dialog = document.getElementById("confirm");
  document.getElementById("confirm-title").textContent = title;
  document.getElementById("confirm-text").textContent = text;
  document.getElementById("reason-label").hidden = !withReason;
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
    dialog.showModal();
  });
}

// A change asked for with `title` and `text` (and a reason, if
// `withReason`), confirmed first: posted to `path`, then `after()`; a
// refusal is shown at the top of the view.
async function confirmedPost(title, text, withReason, path, after) {
  if (!(await confirmAction(title, text, withReason))) return;
  const body = withReason ? { reason: document.getElementById("reason").value } : {};
  try {
    await api(path, { method: "POST", body: JSON.stringify(body) });
  } catch (e) {
    view.prepend(el("p", { class: "error", id: "action-error", text: e.message }));
    return;
  }
  await after();
}

async function device(id) {
  const d = await api(`/console/api/devices/${encodeURIComponent(id)}`);
  const dev = d.device;
  const act = (action) => confirmedPost(
    `${action[0].toUpperCase()}${action.slice(1)} ${dev.id}?`,
    action === "revoke"
      ? "Revoking is final: every certificate of the device stops working and its live connections are cut at once."
      : action === "suspend"
        ? "The device's live connections are cut at once, and it cannot connect until resumed."
        : action === "approve"
          ? "The device may connect with its certificate."
          : "The device may connect again.",
    action === "revoke",
    `/console/api/devices/${encodeURIComponent(dev.id)}/${action}`,
    () => device(id));
  const actions = el("div", { class: "actions" },
    dev.status === "active" ? el("button", { type: "button", class: "warn", id: "action-suspend", onclick: () => act("suspend"), text: "Suspend" }) : null,
    dev.status === "suspended" ? el("button", { type: "button", id: "action-resume", onclick: () => act("resume"), text: "Resume" }) : null,
    dev.status === "pending" ? el("button", { type: "button", id: "action-approve", onclick: () => act("approve"), text: "Approve" }) : null,
    dev.status !== "revoked" ? el("button", { type: "button", class: "danger", id: "action-revoke", onclick: () => act("revoke"), text: "Revoke" }) : null);
  const sessions = d.sessions.length
    ? table(["node", "address", "protocol", "since", "certificate"], d.sessions.map((s) =>
      el("tr", {}, el("td", { class: "mono", text: s.node }), el("td", { class: "mono", text: s.addr }), el("td", { text: s.protocol }), el("td", { text: when(s.since) }), el("td", { class: "mono", text: s.serial }))), { id: "sessions" })
    : el("p", { class: "muted", id: "no-session", text: "Not connected (no node that answered holds a session)." });
  // One certificate revoked: the device's others keep working.
  const revokeCert = (c) => confirmedPost(`Revoke certificate ${c.serial}?`,
    `Only this certificate of ${dev.id} stops working; connections made with it are cut at once.`, true,
    `/console/api/certificates/${encodeURIComponent(c.key)}/revoke`, () => device(id));
  // A new certificate for the device's new key, from its CSR: shown, and
  // listed below with the others.
  const rotate = async () => {
    const dialog = document.getElementById("rotate");
    document.getElementById("rotate-title").textContent = `Rotate ${dev.id}'s certificate`;
    document.getElementById("rotate-csr").value = "";
    document.getElementById("rotate-days").value = "";
    const ok = await new Promise((resolve) => {
      dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
      dialog.showModal();
    });
    if (!ok) return;
    const days = document.getElementById("rotate-days").value;
    const body = { csr: document.getElementById("rotate-csr").value };
    if (days) body.lifetime_days = Number(days);
    let issued;
    try {
      issued = await api(`/console/api/devices/${encodeURIComponent(dev.id)}/rotate`, { method: "POST", body: JSON.stringify(body) });
    } catch (e) {
      view.prepend(el("p", { class: "error", id: "action-error", text: e.message }));
      return;
    }
    await device(id);
    view.insertBefore(el("div", { class: "panel", id: "rotated" },
      el("h2", { text: `New certificate ${issued.serial}` }),
      el("p", { text: "Install this chain (the certificate, then its issuer) on the device beside its new key." }),
      el("pre", { class: "mono", id: "rotated-chain", tabindex: "0", text: issued.chain_pem })), view.children[2] || null);
  };
  if (dev.status === "active") {
    actions.prepend(el("button", { type: "button", id: "action-rotate", onclick: rotate, text: "Rotate certificate" }));
  }
  const pemLink = (c) => el("a", {
    href: `/console/api/certificates/${encodeURIComponent(c.key)}/pem`,
    download: `${dev.id}-${c.serial}.pem`,
    "data-pem": c.serial,
    "aria-label": `Download certificate ${c.serial} as PEM`,
    text: "PEM",
  });
  // What the OCSP responder answers for each: the registry's standing.
  const certs = table(["serial", "valid from", "valid until", "fingerprint (SHA-256)", "issuer", "OCSP says", "", ""],
    dev.certificates.map((c) => el("tr", { "data-serial": c.serial },
      el("td", { class: "mono", text: c.serial }),
      el("td", { text: when(c.not_before) }),
      el("td", { text: when(c.not_after) }),
      el("td", { class: "mono", text: c.fingerprint }),
      el("td", { text: c.issuer }),
      el("td", {}, badge(c.status)),
      el("td", {}, pemLink(c)),
      el("td", {}, c.status === "good"
        ? el("button", { type: "button", class: "quiet", "data-revoke-cert": c.serial, onclick: () => revokeCert(c), text: "Revoke" })
        : null))), { id: "certificates" });
  const commands = d.commands_error
    ? el("p", { class: "error", text: d.commands_error })
    : d.commands.length
      ? table(["#", "topic", "bytes", "QoS", "stored", "expires"], d.commands.map((c) => el("tr", {},
        el("td", { text: String(c.seq) }), el("td", { class: "mono", text: c.topic }), el("td", { text: String(c.bytes) }),
        el("td", { text: String(c.qos) }), el("td", { text: when(c.stored_at_ms) }), el("td", { text: c.expires_at_ms ? when(c.expires_at_ms) : "never" }))), { id: "commands" })
      : el("p", { class: "muted", text: "No commands waiting." });
  const audit = d.audit.length
    ? table(["when", "who", "what", "detail"], d.audit.map((a) => el("tr", {},
      el("td", { text: when(a.at) }), el("td", { text: a.actor }), el("td", { text: a.action }), el("td", { text: a.detail }))), { id: "device-audit" })
    : el("p", { class: "muted", text: "Nothing recorded." });
  const refusals = d.refusals.length
    ? table(["when", "address", "protocol", "reason", "detail"], d.refusals.map((r) => el("tr", {},
      el("td", { text: when(r.at) }), el("td", { class: "mono", text: r.addr || "—" }), el("td", { text: r.protocol }),
      el("td", {}, el("span", { class: "badge revoked", text: r.reason || "refused" })), el("td", { class: "mono", text: r.detail }))), { id: "refusals" })
    : el("p", { class: "muted", id: "no-refusals", text: "No refusals on this node since it started." });
  const claim = d.claim
    ? el("div", { class: "panel", id: "claim" }, el("h2", { text: "Claim" }),
      el("div", { class: "grid" },
        card("uses left", d.claim.uses_left, "claim-uses-left"),
        card("used", d.claim.used, "claim-used"),
        card("manufacturer", d.claim.manufacturer || "—")),
      d.claim.provisioned.length
        ? table(["when", "device", "how"], d.claim.provisioned.map((a) => el("tr", {},
          el("td", { text: when(a.at) }),
          el("td", {}, a.device ? el("a", { href: `#/devices/${encodeURIComponent(a.device)}`, text: a.device }) : "—"),
          el("td", { text: a.actor }))), { id: "claim-devices" })
        : el("p", { class: "muted", text: "No device provisioned yet." }))
    : null;
  const revocation = dev.revocation
    ? el("span", { class: "muted", text: `(${dev.revocation.reason}, ${when(dev.revocation.at)})` })
    : null;
  view.replaceChildren(
    el("h1", {}, el("span", { id: "device-id", text: dev.id }), el("span", { id: "device-status" }, badge(dev.status)), revocation, actions),
    el("div", { class: "grid" },
      card("role", dev.role),
      dev.manufacturer
        ? card("manufacturer", dev.manufacturer, undefined, `#/manufacturers/${encodeURIComponent(dev.manufacturer)}`)
        : card("manufacturer", "—"),
      card("created", new Date(dev.created_at).toLocaleDateString()),
      card("last seen", d.sessions.length ? "now" : d.last_seen ? when(d.last_seen) : "never", "last-seen"),
      card("certificates", dev.certificates.length)),
    claim,
    el("div", { class: "panel" }, el("h2", { text: "Live session" }), sessions),
    el("div", { class: "panel" }, el("h2", { text: "Recent refusals" }), refusals),
    el("div", { class: "panel" }, el("h2", { text: "Certificates" }), certs),
    el("div", { class: "panel" }, el("h2", { text: "Commands queued" }), commands),
    el("div", { class: "panel" }, el("h2", { text: "Audit trail" }), audit));
}

async function manufacturer(name) {
  const m = await api(`/console/api/manufacturers/${encodeURIComponent(name)}`);
  const revoke = () => confirmedPost(`Revoke manufacturer ${m.name}?`,
    `Revoking is final: all ${m.devices} of its devices are refused at once, and their live connections cut.`, true,
    `/console/api/manufacturers/${encodeURIComponent(m.name)}/revoke`, () => manufacturer(name));
  const used = m.jit_quota ? Math.round((100 * m.jit_registered) / m.jit_quota) : 0;
  view.replaceChildren(
    el("h1", {}, el("span", { id: "maker-name", text: m.name }), el("span", { id: "maker-status" }, badge(m.status)),
      m.revocation ? el("span", { class: "muted", text: `(${m.revocation.reason}, ${when(m.revocation.at)})` }) : null,
      el("div", { class: "actions" },
        m.status !== "revoked" ? el("button", { type: "button", class: "danger", id: "action-revoke", onclick: revoke, text: "Revoke" }) : null)),
    el("div", { class: "grid" },
      card("devices", m.devices, "maker-devices", `#/devices?q=${encodeURIComponent(m.name)}`),
      card("policy", m.policy),
      card("CA", m.kind),
      card("registered just in time", `${m.jit_registered} of ${m.jit_quota} (${used}%)`, "maker-jit")),
    el("div", { class: "panel" }, el("h2", { text: "CA certificate" }),
      table(["subject", "serial", "valid until", "key (SHA-256 of the SPKI)", "since"], [el("tr", {},
        el("td", { text: m.subject }), el("td", { class: "mono", text: m.serial }), el("td", { text: when(m.not_after) }),
        el("td", { class: "mono", text: m.spki_sha256 }), el("td", { text: when(m.created_at) }))], { id: "maker-ca" })));
}

const AUDIT_FILTERS = ["actor", "action", "device", "from", "to"];

async function audit(params) {
  const before = params.get("before");
  const trail = (params.get("trail") || "").split(",").filter(Boolean);
  const filter = new URLSearchParams();
  for (const k of AUDIT_FILTERS) if (params.get(k)) filter.set(k, params.get(k));
  const qs = new URLSearchParams(filter);
  if (before) qs.set("before", before);
  const page = await api(`/console/api/audit?${qs}`);
  const rows = page.items.map((a) => el("tr", {},
    el("td", { class: "mono seq", text: String(a.seq) }), el("td", { text: when(a.at) }), el("td", { text: a.actor }),
    el("td", { text: a.action }),
    el("td", {}, a.device ? el("a", { href: `#/devices/${encodeURIComponent(a.device)}`, text: a.device }) : "—"),
    el("td", { text: a.detail })));
  const to = (b, t, f = filter) => {
    const p = new URLSearchParams(f);
    if (b) p.set("before", b);
    if (t.length) p.set("trail", t.join(","));
    location.hash = `#/audit?${p}`;
  };
  const inputs = Object.fromEntries(AUDIT_FILTERS.map((k) => [k, el("input", {
    id: `audit-${k}`, name: k, value: params.get(k) || "",
    type: k === "from" || k === "to" ? "date" : "text",
    placeholder: { actor: "admin:alice", action: "revoke", device: "dev-1" }[k] })]));
  const form = el("form", { class: "filters", id: "audit-filter", onsubmit: (e) => {
    e.preventDefault();
    const f = new URLSearchParams();
    for (const [k, i] of Object.entries(inputs)) if (i.value.trim()) f.set(k, i.value.trim());
    to(null, [], f);
  } },
  AUDIT_FILTERS.map((k) => el("label", {}, el("span", { text: k }), inputs[k])),
  el("button", { type: "submit", text: "Filter" }),
  filter.toString() ? el("a", { href: "#/audit", class: "quiet", text: "Clear" }) : null);
  const exported = (format) => `/console/api/audit?${new URLSearchParams([...filter, ["format", format]])}`;
  view.replaceChildren(
    el("h1", { text: "Audit log" }),
    el("p", { class: "muted", text: "Newest first." }),
    form,
    el("div", { class: "panel" },
      rows.length ? table(["#", "when", "who", "action", "device", "detail"], rows, { id: "audit" }) : el("p", { class: "muted", id: "audit-empty", text: page.next ? "Nothing matches in this stretch: look further back." : "Nothing recorded matches." }),
      el("div", { class: "toolbar" },
        before ? el("button", { type: "button", class: "quiet", id: "newer-page", onclick: () => to(trail[trail.length - 1], trail.slice(0, -1)), text: "Newer" }) : null,
        before ? el("button", { type: "button", class: "quiet", onclick: () => to(null, []), text: "Newest" }) : null,
        page.next ? el("button", { type: "button", id: "next-page", onclick: () => to(page.next, before ? [...trail, before] : trail), text: "Older" }) : null,
        el("a", { href: exported("csv"), id: "export-csv", download: "audit.csv", text: "Export CSV" }),
        el("a", { href: exported("json"), id: "export-json", download: "audit.json", text: "Export JSON" }))));
}

function liveActivity() {
  const feed = el("ul", { class: "feed", id: "activity", tabindex: "0", "aria-label": "live activity" });
  view.replaceChildren(
    el("h1", { text: "Live activity" }),
    el("p", { class: "muted", text: "Refusals and cut connections as they happen, newest first." }),
    el("div", { class: "panel" }, feed));
  follow(feed);
}

async function route() {
  const hash = location.hash || "#/";
  const [path, query] = hash.slice(1).split("?");
  const params = new URLSearchParams(query || "");
  const parts = path.split("/").filter(Boolean);
  const name = parts[0] || "overview";
  for (const a of document.querySelectorAll("header nav a")) {
    a.classList.toggle("active", a.dataset.view === name);
  }
  stopActivity();
  try {
    if (name === "devices" && parts[1]) await device(decodeURIComponent(parts[1]));
    else if (name === "manufacturers" && parts[1]) await manufacturer(decodeURIComponent(parts[1]));
    else if (name === "devices") await devices(params);
    else if (name === "audit") await audit(params);
    else if (name === "activity") liveActivity();
    else await overview();
  } catch (e) {
    if (e.message !== "signed out") view.replaceChildren(el("p", { class: "error", text: e.message }));
  }
}

async function start() {
  try {
    me = await api("/console/api/me");
  } catch {
    return;
  }
  document.getElementById("who").textContent = `signed in as ${me.admin}${me.session ? "" : " (certificate)"}`;
  const out = document.getElementById("logout");
  if (me.session) {
    out.addEventListener("click", async () => {
      await api("/console/logout", { method: "POST" }).catch(() => {});
      signedOut();
    });
  } else {
    out.hidden = true;
  }
  window.addEventListener("hashchange", route);
  await route();
}

start();
