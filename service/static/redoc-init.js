// Redoc on the schema beside this page ("/redoc" -> "/openapi.json").
(function () {
  "use strict";
  var base = window.location.pathname.replace(/redoc\/?$/, "");
  Redoc.init(base + "openapi.json", {}, document.getElementById("redoc"));
})();
