// runledger dashboard: live updates. The page works without this script;
// with it, the page's <main> is redrawn from the server when an event
// commits (lock grants and releases included), and every 30 s for what
// changes without an event: ages, and processes that died. On the page of
// an active run, what its log gets is appended every second.
(function () {
  "use strict";
  var base = document.body.getAttribute("data-base") || "";
  var live = document.getElementById("live");
  var busy = false, again = false;
  function redraw() {
    if (busy) { again = true; return; }
    busy = true;
    fetch(location.href, { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (r) { return r.ok ? r.text() : Promise.reject(r.status); })
      .then(function (text) {
        var next = new DOMParser().parseFromString(text, "text/html").querySelector("main");
        var main = document.querySelector("main");
        if (next && main) {
          keepLog(main, next);
          var focus = keepInputs(main, next);
          main.replaceWith(next);
          if (focus) { focus.focus(); }
        }
      })
      .catch(function () {})
      .then(function () {
        busy = false;
        if (again) { again = false; setTimeout(redraw, 200); }
      });
  }
  var timer = null;
  function soon() { if (!timer) { timer = setTimeout(function () { timer = null; redraw(); }, 150); } }
  if (window.EventSource) {
    var feed = new EventSource(base + "/api/events");
    // Subscribed from now: one redraw once it is open covers what committed
    // between the page's drawing (or a lost connection) and then.
    feed.onopen = function () {
      if (live) { live.textContent = "live"; live.className = "on"; }
      soon();
    };
    feed.onerror = function () { if (live) { live.textContent = "reconnecting"; live.className = "off"; } };
    feed.onmessage = soon;
  }
  setInterval(function () { if (!document.hidden) { soon(); } }, 30000);

  // What a person typed in a form (a reason, a name) is kept across a
  // redraw, in the same field of the same form of the new page, and so is
  // the focus; returns the field to focus.
  function keepInputs(main, next) {
    var focus = null;
    var fields = main.querySelectorAll("form input[name], form textarea[name]");
    for (var i = 0; i < fields.length; i++) {
      var field = fields[i];
      if (field.type === "hidden" || field.value === field.defaultValue) { continue; }
      var action = field.form ? field.form.getAttribute("action") : null;
      var twin = next.querySelector((action === null ? "form" : 'form[action="' + CSS.escape(action) + '"]') +
        ' [name="' + CSS.escape(field.name) + '"]');
      if (!twin) { continue; }
      twin.value = field.value;
      if (document.activeElement === field) { focus = twin; }
    }
    return focus;
  }

  // The log. Its <pre> holds the text up to byte data-log-offset of the
  // file, which the server renders; the poll appends what follows it. A
  // redraw keeps the <pre> shown (with what was appended, from where it
  // left off) unless the file was cut (the new one's offset is smaller),
  // so no line is lost or shown twice.
  function logOf(root) { return root.querySelector("pre.log[data-log-url]"); }
  function offsetOf(pre) { return Number(pre.getAttribute("data-log-offset")); }
  function keepLog(main, next) {
    var old = logOf(main), fresh = logOf(next);
    if (!old || !fresh || old.getAttribute("data-log-url") !== fresh.getAttribute("data-log-url")) { return; }
    if (offsetOf(fresh) < offsetOf(old)) { return; }
    if (fresh.hasAttribute("data-log-active")) { old.setAttribute("data-log-active", ""); }
    else { old.removeAttribute("data-log-active"); }
    fresh.replaceWith(old);
  }
  // Appended text kept at most: the oldest lines go first.
  var KEEP = 1 << 20;
  var polling = false;
  function poll() {
    var pre = logOf(document);
    if (!pre) { polling = false; return; }
    polling = true;
    var from = offsetOf(pre);
    fetch(pre.getAttribute("data-log-url") + "?from=" + from,
          { credentials: "same-origin", headers: { "Accept": "application/json" } })
      .then(function (r) { return r.ok ? r.json() : Promise.reject(r.status); })
      .then(function (chunk) {
        var now = logOf(document);
        // A redraw in between brought a log of its own: read on from it.
        if (now !== pre || offsetOf(pre) !== from) { return setTimeout(poll, 0); }
        var atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
        if (chunk.reset) { pre.textContent = chunk.text; }
        else if (chunk.text) { pre.appendChild(document.createTextNode(chunk.text)); }
        if (pre.textContent.length > KEEP) {
          var text = pre.textContent, cut = text.indexOf("\n", text.length - KEEP);
          pre.textContent = text.slice(cut < 0 ? text.length - KEEP : cut + 1);
        }
        pre.setAttribute("data-log-offset", String(chunk.offset));
        if (atEnd) { pre.scrollTop = pre.scrollHeight; }
        if (chunk.more) { setTimeout(poll, 0); }
        else if (chunk.active) { setTimeout(poll, document.hidden ? 5000 : 1000); }
        else { pre.removeAttribute("data-log-active"); polling = false; }
      })
      .catch(function (status) {
        // Refused (the run or its log is gone): stop; else try again.
        if (status >= 400 && status < 500) { polling = false; } else { setTimeout(poll, 5000); }
      });
  }
  function startLog() {
    var pre = logOf(document);
    if (!polling && pre && pre.hasAttribute("data-log-active")) { poll(); }
  }
  startLog();
  // A redraw may show the log of a run that became active.
  new MutationObserver(startLog).observe(document.body, { childList: true });
})();
