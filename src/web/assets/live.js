// runledger dashboard: live updates. The page works without this script;
// with it, the page's <main> is redrawn from the server when an event
// commits (lock grants and releases included), and every 30 s for what
// changes without an event: ages, and processes that died.
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
        if (next && main) { main.replaceWith(next); }
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
})();
