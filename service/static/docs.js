// swagger-ui on the schema beside this page ("/docs" -> "/openapi.json", and behind a
// proxy "/prefix/docs" -> "/prefix/openapi.json").
(function () {
  "use strict";
  var base = window.location.pathname.replace(/docs\/?$/, "");
  var prefix = base.replace(/\/$/, "");
  var origin = window.location.origin;
  window.ui = SwaggerUIBundle({
    url: base + "openapi.json",
    dom_id: "#swagger-ui",
    presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset],
    layout: "BaseLayout",
    deepLinking: true,
    showExtensions: true,
    showCommonExtensions: true,
    persistAuthorization: true,
    // Its default sends the schema to an online validator.
    validatorUrl: null,
    oauth2RedirectUrl: origin + base + "docs/oauth2-redirect",
    // The schema's paths are the service's own ("/v1/..."): behind a prefix, "Try it out"
    // must go through it too.
    requestInterceptor: function (request) {
      if (prefix && request.url.indexOf(origin + "/") === 0 &&
          request.url.indexOf(origin + prefix + "/") !== 0) {
        request.url = origin + prefix + request.url.slice(origin.length);
      }
      return request;
    },
  });
})();
