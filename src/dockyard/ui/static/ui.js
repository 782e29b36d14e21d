// Dockyard's web UI: the little that needs script. Every page works without it (reading,
// forms); this adds copy-to-clipboard and "select every tag". No inline script anywhere: the
// Content-Security-Policy allows scripts from this file only.
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  for (const button of document.querySelectorAll("button[data-copy]")) {
    button.addEventListener("click", async () => {
      const source = document.getElementById(button.dataset.copy);
      if (!source) return;
      try {
        await navigator.clipboard.writeText(source.textContent);
        button.textContent = "Copied";
      } catch {
        // No clipboard (plain http, or denied): select the text so Ctrl+C copies it.
        const range = document.createRange();
        range.selectNodeContents(source);
        const selection = window.getSelection();
        selection.removeAllRanges();
        selection.addRange(range);
        button.textContent = "Selected: press Ctrl+C";
      }
      setTimeout(() => { button.textContent = "Copy"; }, 2000);
    });
  }
  for (const all of document.querySelectorAll("input[data-select-all]")) {
    const boxes = () => all.form
      ? all.form.querySelectorAll(`input[type=checkbox][name="${all.dataset.selectAll}"]`)
      : document.querySelectorAll(`input[type=checkbox][name="${all.dataset.selectAll}"]`);
    all.addEventListener("change", () => {
      for (const box of boxes()) box.checked = all.checked;
    });
  }
});
