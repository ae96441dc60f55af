# The documentation site (included by the Makefile, which defines BIN, STAMP, install and export).
#   make docs          build _docs/ from the notebooks: nbdev_docs where Quarto is installed, else nbdev + smalldocs
#   make docs-check    check the site already in _docs/ (a page per notebook, every internal link resolves)
#   make docs-browser  make sure a headless Chromium is there for the docs tests (Debian package `chromium`)
#   make docs-test     docs-browser, then tests/test_docs.py: build, pages, links, DOM and screenshots in Chromium
#   make docs-preview  build, then serve _docs/ on http://127.0.0.1:4200
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
DOCS_PORT ?= 4200

.PHONY: docs docs-check docs-browser docs-test docs-preview

docs: export
	$(BIN)/python tools/build_docs.py

docs-check: install
	$(BIN)/python tools/build_docs.py --check

docs-browser:
	@if [ -n "$$CHROMIUM" ] || command -v chromium >/dev/null || command -v chromium-browser >/dev/null; then \
		echo "chromium: $${CHROMIUM:-$$(command -v chromium || command -v chromium-browser)}"; \
	elif command -v apt-get >/dev/null; then \
		echo "installing the Debian package chromium for the docs tests"; \
		export DEBIAN_FRONTEND=noninteractive; \
		$(SUDO) apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 \
		|| { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q --no-install-recommends chromium; }; \
	else \
		echo "the docs tests need Chromium: install it (package 'chromium') or set CHROMIUM=/path/to/chrome"; exit 1; \
	fi

docs-test: export docs-browser
	$(BIN)/python -m pytest tests/test_docs.py -q -rs

docs-preview: docs
	$(BIN)/python -m http.server $(DOCS_PORT) --bind 127.0.0.1 --directory _docs
