/* rib-edge tracker: records a kiosk product page's micro behaviors and sends them to the device's local
 * server (same origin, POST /events). Raw events stay on the device: the server turns them into encrypted
 * micro-behavior tuples. No dependencies.
 *
 * Markup it reads:
 *   <body data-rib-item="SKU" data-rib-source="search">   product page: item id and how it was reached
 *                                                         (home | shop_list | sale | cart | search)
 *   <section data-rib-module="comments">                  module views (comments | specification | bottom)
 *   <button data-rib-action="cart">                       cart / order clicks (on the page's item, or the
 *                                                         closest data-rib-item ancestor's)
 * An app with its own behaviors (a hotel, media or grocery kiosk) names them with the activity names its
 * model package ships (vocab.json); each becomes an "action" event:
 *   <body data-rib-item="ROOM" data-rib-enter-action="ViewRoom">   the page's entry, instead of page_enter
 *   <button data-rib-action="Book">                       a click (any name but cart / order)
 *   <section data-rib-seen-action="ReadReviews">          when half of it has been on screen, once
 *   <a data-rib-item="OTHER">                             tiles of other items: hover after a 300 ms rest
 * API: ribEdge.recommend(k) -> Promise of the JSON answer of GET /recommendations, asked once the queued
 * events have been answered (so the answer counts them); ribEdge.flush() -> Promise of the server's answers.
 * DOM events on document, for a page that shows what it records: "ribedge:track" (detail: the event, as
 * queued) and "ribedge:sent" (detail: {events, answer}; answer is the JSON of POST /events, null when the
 * post failed or went as a beacon at unload).
 */
(function (global) {
  "use strict";

  var ENDPOINT = "/events";
  var SESSION_KEY = "ribEdgeSession";
  var SESSION_IDLE_MS = 30 * 60 * 1000;
  var HOVER_REST_MS = 300;
  var SCROLL_THROTTLE_MS = 500;
  var FLUSH_DELAY_MS = 1000;
  var MAX_BATCH = 50;

  var queue = [];
  var flushTimer = null;
  var root = document.body || document.documentElement;
  var pageItem = root.getAttribute("data-rib-item");
  var pageSource = root.getAttribute("data-rib-source") || "home";
  var enterAction = root.getAttribute("data-rib-enter-action");

  function newId() {
    if (global.crypto && global.crypto.randomUUID) {
      return global.crypto.randomUUID();
    }
    return "s" + Date.now().toString(36) + Math.random().toString(36).slice(2, 10);
  }

  function sessionId() {
    var now = Date.now();
    var stored = null;
    try {
      stored = JSON.parse(global.sessionStorage.getItem(SESSION_KEY) || "null");
    } catch (e) {
      stored = null;
    }
    if (!stored || typeof stored.id !== "string" || now - stored.last > SESSION_IDLE_MS) {
      stored = { id: newId(), last: now };
    }
    stored.last = now;
    try {
      global.sessionStorage.setItem(SESSION_KEY, JSON.stringify(stored));
    } catch (e) {
      /* storage may be disabled: the id then lives for this page only */
    }
    return stored.id;
  }

  var session = sessionId();

  function announce(name, detail) {
    try {
      document.dispatchEvent(new CustomEvent(name, { detail: detail }));
    } catch (e) {
      /* a listener of the page failed: never break tracking */
    }
  }

  // Resolves (never rejects) to the server's answer, or null.
  function send(batch, unloading) {
    var body = JSON.stringify(batch);
    var done = function (answer) {
      announce("ribedge:sent", { events: batch, answer: answer });
      return answer;
    };
    if (unloading && global.navigator && global.navigator.sendBeacon) {
      if (global.navigator.sendBeacon(ENDPOINT, new Blob([body], { type: "application/json" }))) {
        return Promise.resolve(done(null));
      }
    }
    if (!global.fetch) {
      return Promise.resolve(done(null));
    }
    return global.fetch(ENDPOINT, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: body,
      keepalive: true,
      credentials: "same-origin"
    }).then(function (response) {
      return response.ok ? response.json() : null;
    }).catch(function () {
      return null; /* the device server is down: drop, never break the page */
    }).then(done);
  }

  function flush(unloading) {
    if (flushTimer !== null) {
      clearTimeout(flushTimer);
      flushTimer = null;
    }
    var sent = [];
    while (queue.length) {
      sent.push(send(queue.splice(0, MAX_BATCH), unloading));
    }
    return Promise.all(sent);
  }

  function track(type, fields) {
    var event = { session_id: session, timestamp_ms: Date.now(), event_type: type };
    for (var key in fields) {
      if (Object.prototype.hasOwnProperty.call(fields, key) && fields[key] !== undefined && fields[key] !== null) {
        event[key] = fields[key];
      }
    }
    queue.push(event);
    announce("ribedge:track", event);
    if (queue.length >= MAX_BATCH) {
      flush(false);
    } else if (flushTimer === null) {
      flushTimer = setTimeout(function () { flush(false); }, FLUSH_DELAY_MS);
    }
  }

  function itemOf(element) {
    var holder = element.closest ? element.closest("[data-rib-item]") : null;
    var item = holder && holder !== root ? holder.getAttribute("data-rib-item") : pageItem;
    return item || pageItem;
  }

  // page_enter, or the app's own entry action
  if (pageItem && enterAction) {
    track("action", { item_id: pageItem, action: enterAction });
  } else if (pageItem) {
    track("page_enter", { item_id: pageItem, page_source: pageSource });
  }

  // module_view and the app's seen-actions: each counts once, when half of it has been on screen
  var modules = document.querySelectorAll("[data-rib-module], [data-rib-seen-action]");
  if (pageItem && modules.length && global.IntersectionObserver) {
    var seen = {};
    var observer = new IntersectionObserver(function (entries) {
      entries.forEach(function (entry) {
        var module = entry.target.getAttribute("data-rib-module");
        var action = entry.target.getAttribute("data-rib-seen-action");
        var key = module ? "module:" + module : "action:" + action;
        if (entry.isIntersecting && !seen[key]) {
          seen[key] = true;
          if (module) {
            track("module_view", { item_id: pageItem, module: module });
          } else {
            track("action", { item_id: pageItem, action: action });
          }
          observer.unobserve(entry.target);
        }
      });
    }, { threshold: 0.5 });
    Array.prototype.forEach.call(modules, function (el) { observer.observe(el); });
  }

  // cart / order clicks, and the app's own actions
  document.addEventListener("click", function (e) {
    var target = e.target && e.target.closest ? e.target.closest("[data-rib-action]") : null;
    if (!target) {
      return;
    }
    var action = target.getAttribute("data-rib-action");
    var item = itemOf(target);
    if ((action === "cart" || action === "order") && item) {
      track(action, { item_id: item });
      if (action === "order") {
        flush(false);
      }
    } else if (action && item) {
      track("action", { item_id: item, action: action });
    }
  }, true);

  // hover: the pointer rested on a tile for HOVER_REST_MS; value = rest duration in ms
  var hoverTile = null;
  var hoverStart = 0;
  var hoverTimer = null;
  function endHover() {
    if (hoverTimer !== null) {
      clearTimeout(hoverTimer);
      hoverTimer = null;
    }
    if (hoverTile && Date.now() - hoverStart >= HOVER_REST_MS) {
      track("hover", { item_id: hoverTile.getAttribute("data-rib-item"), value: Date.now() - hoverStart });
    }
    hoverTile = null;
  }
  document.addEventListener("pointerover", function (e) {
    var tile = e.target && e.target.closest ? e.target.closest("[data-rib-item]") : null;
    if (tile === root) {
      tile = null;
    }
    if (tile === hoverTile) {
      return;
    }
    endHover();
    if (tile) {
      hoverTile = tile;
      hoverStart = Date.now();
    }
  });
  document.addEventListener("pointerout", function (e) {
    if (hoverTile && !(e.relatedTarget && hoverTile.contains(e.relatedTarget))) {
      endHover();
    }
  });

  // scroll depth in [0, 1], throttled, only when it grows
  var maxDepth = 0;
  var scrollTimer = null;
  function reportScroll() {
    scrollTimer = null;
    var doc = document.documentElement;
    var scrollable = Math.max(1, doc.scrollHeight - global.innerHeight);
    var depth = Math.min(1, Math.max(0, (global.scrollY || doc.scrollTop || 0) / scrollable));
    depth = Math.round(depth * 100) / 100;
    if (pageItem && depth > maxDepth) {
      maxDepth = depth;
      track("scroll", { item_id: pageItem, value: depth });
    }
  }
  global.addEventListener("scroll", function () {
    if (scrollTimer === null) {
      scrollTimer = setTimeout(reportScroll, SCROLL_THROTTLE_MS);
    }
  }, { passive: true });

  // visibility: the dwell clock pauses while hidden
  document.addEventListener("visibilitychange", function () {
    if (document.visibilityState === "hidden") {
      track("visibility_hidden", {});
      flush(true);
    } else {
      track("visibility_visible", {});
    }
  });

  // page_leave
  global.addEventListener("pagehide", function () {
    endHover();
    if (pageItem) {
      track("page_leave", { item_id: pageItem });
    }
    flush(true);
  });

  global.ribEdge = {
    track: track,
    flush: function () { return flush(false); },
    recommend: function (k) {
      var n = Math.max(1, Math.min(100, parseInt(k, 10) || 10));
      // Ask only once the queued events are answered: a parallel GET could overtake the POST.
      return flush(false).then(function () {
        return global.fetch("/recommendations?k=" + n, { credentials: "same-origin" });
      }).then(function (response) {
        if (!response.ok) {
          throw new Error("recommendations failed: HTTP " + response.status);
        }
        return response.json();
      });
    }
  };
})(window);
