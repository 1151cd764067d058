/* rib-edge kiosk demo: the page glue. Load it BEFORE /tracker.js: on a product page it tells the tracker
 * which product this is (body data-rib-item / data-rib-source from ?item=&source=), and it must listen
 * before the tracker records page_enter. The tracker does the recording; this file only renders.
 *
 * What it renders (stable ids and data attributes, read by tests/edge_client/test_kiosk_browser.py):
 *   #recs    <ol data-state="loading|ready|error" data-updates="N" data-model-version="V">
 *              <li data-rec-item="ID" data-rec-source="model|popularity" data-rec-score="S">
 *   #visit   the tuples the model saw: <li data-item data-activity data-dwell data-weight>
 *   #log     the events this page recorded: <li data-type data-item data-module
 *                                                data-state="queued|stored|refused|beacon">
 */
(function (global) {
  "use strict";

  var SOURCES = ["home", "shop_list", "sale", "cart", "search"];
  var K = 6;
  var body = document.body;
  var page = body.getAttribute("data-kiosk-page");  // "home" | "product"
  var linkSource = body.getAttribute("data-kiosk-link-source") || "home";  // how #recs tiles are reached
  var params = new URLSearchParams(global.location.search);
  var logged = new WeakMap();  // event object -> its #log row
  var latest = 0;  // sequence number of the newest recommendation request

  function el(tag, attrs, text) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (name) { node.setAttribute(name, attrs[name]); });
    if (text !== undefined) {
      node.textContent = text;
    }
    return node;
  }

  function productUrl(item, source) {
    return "product.html?item=" + encodeURIComponent(item) + "&source=" + source;
  }

  function swatch(item) {  // a stand-in product picture: a colour derived from the id
    var hue = 0;
    for (var i = 0; i < item.length; i++) {
      hue = (hue * 31 + item.charCodeAt(i)) % 360;
    }
    return el("span", { "class": "swatch", style: "background: hsl(" + hue + ", 55%, 70%)", "aria-hidden": "true" });
  }

  // -- product page: declare the product before the tracker reads the body ---------------------------------
  if (page === "product") {
    var item = params.get("item") || "";
    var source = params.get("source");
    if (item && item.length <= 128 && !/[\u0000-\u001f]/.test(item)) {
      body.setAttribute("data-rib-item", item);
      body.setAttribute("data-rib-source", SOURCES.indexOf(source) >= 0 ? source : "home");
      document.title = "Product " + item + " - rib-edge kiosk";
      document.getElementById("title").textContent = "Product " + item;
      document.getElementById("picture").replaceWith(swatch(item));
    } else {
      document.getElementById("title").textContent = "No such product";
    }
  }

  // -- the log of recorded events -------------------------------------------------------------------------
  document.addEventListener("ribedge:track", function (e) {
    var event = e.detail;
    var row = el("li", { "data-type": event.event_type, "data-state": "queued" },
      [event.event_type, event.item_id, event.page_source, event.module, event.value].filter(function (v) {
        return v !== undefined;
      }).join(" "));
    if (event.item_id !== undefined) { row.setAttribute("data-item", event.item_id); }
    if (event.module !== undefined) { row.setAttribute("data-module", event.module); }
    logged.set(event, row);
    var log = document.getElementById("log");
    log.appendChild(row);
    log.scrollTop = log.scrollHeight;
    if (event.event_type === "cart" || event.event_type === "order") {
      setTimeout(refresh, 0);  // show what the cart changed
    }
  });
  document.addEventListener("ribedge:sent", function (e) {
    var answer = e.detail.answer;
    e.detail.events.forEach(function (event, i) {
      var row = logged.get(event);
      if (row) {
        var result = answer && answer.results ? answer.results[i] : null;
        row.setAttribute("data-state", result ? (result.ok ? "stored" : "refused") : "beacon");
        if (result && !result.ok) { row.title = result.reason; }
      }
    });
  });

  // -- recommendations ------------------------------------------------------------------------------------
  function render(answer) {
    var recs = document.getElementById("recs");
    var visit = document.getElementById("visit");
    recs.textContent = "";
    visit.textContent = "";
    answer.recommendations.forEach(function (rec) {
      var li = el("li", { "data-rec-item": rec.item_id, "data-rec-source": rec.source, "data-rec-score": String(rec.score) });
      var link = el("a", { "class": "tile", href: productUrl(rec.item_id, linkSource), "data-rib-item": rec.item_id });
      link.appendChild(swatch(rec.item_id));
      link.appendChild(el("span", {}, "Product " + rec.item_id));
      var top = rec.explanation.slice().sort(function (a, b) { return b.weight - a.weight; })[0];
      link.appendChild(el("small", {}, top ? " because of " + top.activity + " on " + top.item_id : " popular here"));
      li.appendChild(link);
      recs.appendChild(li);
    });
    var tuples = answer.recommendations.length ? answer.recommendations[0].explanation : [];
    tuples.forEach(function (t) {
      visit.appendChild(el("li", { "data-item": t.item_id, "data-activity": t.activity, "data-dwell": String(t.dwell_bucket),
        "data-weight": String(t.weight) }, t.item_id + " \u00b7 " + t.activity + " \u00b7 dwell " + t.dwell_bucket +
        " \u00b7 attention " + Math.round(t.weight * 100) + "%"));
    });
    if (!tuples.length) {
      visit.appendChild(el("li", {}, "nothing yet: popular items are shown"));
    }
    recs.setAttribute("data-model-version", String(answer.model_version));
    document.getElementById("recs-meta").textContent = "model v" + answer.model_version + ", " +
      (answer.recommendations[0] ? answer.recommendations[0].source : "no items");
  }

  function refresh() {
    var recs = document.getElementById("recs");
    var seq = ++latest;
    recs.setAttribute("data-state", "loading");
    return global.ribEdge.recommend(K).then(function (answer) {
      if (seq === latest) {  // a slower, older answer must not replace a newer one
        render(answer);
        recs.setAttribute("data-state", "ready");
      }
    }).catch(function (err) {
      if (seq === latest) {
        recs.textContent = "";
        recs.appendChild(el("li", {}, "no recommendations: " + err.message));
        recs.setAttribute("data-state", "error");
      }
    }).then(function () {
      if (seq === latest) {
        recs.setAttribute("data-updates", String(Number(recs.getAttribute("data-updates") || 0) + 1));
      }
    });
  }

  // -- wiring, once /tracker.js has run -------------------------------------------------------------------
  document.addEventListener("DOMContentLoaded", function () {
    document.getElementById("refresh").addEventListener("click", refresh);
    var search = document.getElementById("search-form");
    search.addEventListener("submit", function (e) {
      e.preventDefault();
      var wanted = document.getElementById("search").value.trim();
      if (wanted) {
        global.location.href = productUrl(wanted, "search");
      }
    });
    refresh();
  });
})(window);
