"""Static files storage: whitenoise's compressed manifest storage, with every ES module import
rewritten to its hashed name.

Without `support_js_module_import_aggregation` the collected `app.<hash>.js` still imports
`./render.js` by its plain name, so after an upgrade a browser can run a new module with an
old (cached) sibling. With it, `import … from "./render.js";` becomes
`import … from "./render.<hash>.js";` in every collected module, so each module is cache-busted.
"""

from whitenoise.storage import CompressedManifestStaticFilesStorage


class ModuleManifestStorage(CompressedManifestStaticFilesStorage):
    support_js_module_import_aggregation = True
