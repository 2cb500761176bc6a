// dermgate console: automatic logoff, heatmap controls, keyboard shortcuts, print.
// A static file (the Content-Security-Policy allows no inline script).
(function () {
  "use strict";
  var body = document.body;

  // Automatic logoff: after the idle limit the page goes to the sign-in page, which ends the session
  // (the server ends it anyway on the next request; this keeps PHI off an unattended screen).
  var idle = parseInt(body.getAttribute("data-idle-timeout") || "0", 10);
  if (idle > 0) {
    window.setTimeout(function () { window.location.assign("/login?reason=idle"); }, idle * 1000 + 500);
  }

  // Heatmap over the image: toggle and opacity.
  var overlay = document.getElementById("heatmap-overlay");
  var toggle = document.getElementById("heatmap-toggle");
  var opacity = document.getElementById("heatmap-opacity");
  var shown = document.getElementById("opacity-value");
  function applyOpacity() {
    if (!overlay || !opacity) { return; }
    overlay.style.opacity = String(parseInt(opacity.value, 10) / 100);
    if (shown) { shown.textContent = opacity.value + "%"; }
  }
  function applyToggle() {
    if (!overlay || !toggle) { return; }
    overlay.classList.toggle("hidden", !toggle.checked);
  }
  if (opacity) { opacity.addEventListener("input", applyOpacity); applyOpacity(); }
  if (toggle) { toggle.addEventListener("change", applyToggle); applyToggle(); }

  var printButton = document.getElementById("print-button");
  if (printButton) { printButton.addEventListener("click", function () { window.print(); }); }

  // Keyboard shortcuts (not while typing in a field).
  var rows = Array.prototype.slice.call(document.querySelectorAll("a.case-link"));
  var current = -1;
  function select(i) {
    if (!rows.length) { return; }
    current = Math.max(0, Math.min(rows.length - 1, i));
    rows.forEach(function (a, k) { a.closest("tr").classList.toggle("selected", k === current); });
    rows[current].focus();
  }
  function click(id) {
    var el = document.getElementById(id);
    if (el) { el.click(); return true; }
    return false;
  }
  document.addEventListener("keydown", function (ev) {
    if (ev.ctrlKey || ev.metaKey || ev.altKey) { return; }
    var t = ev.target;
    if (t && (t.tagName === "INPUT" || t.tagName === "TEXTAREA" || t.tagName === "SELECT" || t.isContentEditable)) { return; }
    var handled = true;
    switch (ev.key) {
      case "j": select(current + 1); break;
      case "k": select(current - 1); break;
      case "c": handled = click("confirm-button"); break;
      case "o":
        var dx = document.getElementById("diagnosis");
        if (dx && !dx.value) { dx.focus(); } else { handled = click("override-button"); }
        break;
      case "n": handled = click("next-case"); break;
      case "w": handled = click("to-worklist"); break;
      case "h":
        if (toggle) { toggle.checked = !toggle.checked; applyToggle(); } else { handled = false; }
        break;
      default: handled = false;
    }
    if (handled) { ev.preventDefault(); }
  });
})();
