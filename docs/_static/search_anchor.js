// Sphinx's search page cuts each result's summary at its anchor with
// querySelector("#" + anchor); the ids of documented objects contain dots
// ("crossent.info.entropy"), which a CSS selector reads as classes, so the
// lookup fails and the browser logs a warning. Escape the id first.
(() => {
  if (typeof Search === "undefined" || !window.CSS) return;
  const htmlToText = Search.htmlToText;
  Search.htmlToText = (htmlString, anchor) =>
    htmlToText(
      htmlString,
      anchor && anchor.startsWith("#") ? "#" + CSS.escape(anchor.slice(1)) : anchor,
    );
})();
