# Two commands: `make run` and `make test`. Both build .venv from nothing when it is missing,
# and reinstall only when pyproject.toml changed (the stamp files record the last install).
#
# EXTRAS picks the TensorFlow build: cpu (tensorflow-cpu) or gpu (tensorflow[and-cuda]). The two
# must never share an environment, so the build a .venv got first is recorded in .venv/.extras
# and is the default from then on: `make run EXTRAS=gpu` then `make test` tests the GPU build.
# The `test` and `docs` extras hold only the test tools and the documentation site's, installed on
# top: `.[$(EXTRAS),test,docs]`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# NiiVue, pinned, for the viewer pages (the `niivue` target below says how it is fetched); defined
# here because `run` and `test` name it as a prerequisite, which make expands where it reads them.
NIIVUE_VERSION := 0.69.0
NIIVUE_SHA256 := 47b896b77ec4a5be3ef1949c33ad393b6f45629921f326c279000bcf51bdb4af
NIIVUE_JS := src/medseg/evaluation/assets/niivue.js
EXTRAS_FILE := $(VENV)/.extras
# Without .extras, the install stamps tell the build: .installed-gpu holds tensorflow[and-cuda],
# .installed-cpu and .installed-test hold tensorflow-cpu.
BUILT_EXTRAS := $(strip $(shell cat $(EXTRAS_FILE) 2>/dev/null || \
	if [ -e $(VENV)/.installed-gpu ]; then echo gpu; \
	elif [ -e $(VENV)/.installed-cpu ] || [ -e $(VENV)/.installed-test ]; then echo cpu; fi))
EXTRAS ?= $(or $(BUILT_EXTRAS),cpu)
export KEDRO_DISABLE_TELEMETRY := true
export TF_CPP_MIN_LOG_LEVEL := 2

# An environment whose stamps disagree may hold both builds; pip cannot repair that.
CHECK_ONE_TENSORFLOW := $(PY) -c 'import sys; from importlib.metadata import distributions; \
names = {d.metadata["Name"].lower().replace("_", "-") for d in distributions()}; \
sys.exit("$(VENV) holds both tensorflow and tensorflow-cpu: remove $(VENV) (rm -rf $(VENV)) and rerun." \
if {"tensorflow", "tensorflow-cpu"} <= names else 0)'

.PHONY: run test test-quick docs viz benchmarks clean-data check-extras dicom-tools niivue browser-tools serve-onnx-env

$(PY):
	$(PYTHON) -m venv $(VENV)

# Refuse to add one TensorFlow build to an environment that holds the other.
check-extras:
	@case "$(EXTRAS)" in cpu|gpu) ;; *) echo "EXTRAS must be cpu or gpu, not '$(EXTRAS)'." >&2; exit 1;; esac
	@if [ -n "$(BUILT_EXTRAS)" ] && [ "$(BUILT_EXTRAS)" != "$(EXTRAS)" ]; then \
		echo "$(VENV) holds the $(BUILT_EXTRAS) build of TensorFlow; installing EXTRAS=$(EXTRAS) beside it would mix both." >&2; \
		echo "Run with EXTRAS=$(BUILT_EXTRAS), or remove $(VENV) (rm -rf $(VENV)) to switch to $(EXTRAS)." >&2; \
		exit 1; \
	fi

$(VENV)/.installed-$(EXTRAS): pyproject.toml | $(PY) check-extras
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]'
	@$(CHECK_ONE_TENSORFLOW)
	echo $(EXTRAS) > $(EXTRAS_FILE)
	touch $@

$(VENV)/.installed-$(EXTRAS)-test: pyproject.toml | $(PY) check-extras
	$(PY) -m pip install --quiet -e '.[$(EXTRAS),test,docs]'
	@$(CHECK_ONE_TENSORFLOW)
	echo $(EXTRAS) > $(EXTRAS_FILE)
	touch $@

run: $(VENV)/.installed-$(EXTRAS) $(NIIVUE_JS)
	$(VENV)/bin/kedro run

# The viewer pages (medseg.evaluation.viewer) inline NiiVue's browser bundle, so that a page opens
# offline: its UMD build (dist/niivue.umd.js, one script with its dependencies, no import) is
# fetched once from the npm registry (npm checks the package's integrity, and the file's SHA-256
# is checked against the one pinned here) into the package, where git ignores it. The package
# ships no LICENSE file: its BSD-2-Clause text is kept beside the script (niivue.LICENSE, in git),
# and the fetch fails if a new version declares another licence.

$(NIIVUE_JS):
	@command -v npm >/dev/null || { echo "niivue: npm fetches NiiVue $(NIIVUE_VERSION) once for the viewer pages; install Node.js and npm (apt-get install npm)." >&2; exit 1; }
	@tmp=$$(mktemp -d) && (cd $$tmp && npm pack --silent @niivue/niivue@$(NIIVUE_VERSION) >/dev/null) && \
		tar -xzf $$tmp/niivue-niivue-$(NIIVUE_VERSION).tgz -C $$tmp package/dist/niivue.umd.js package/package.json && \
		licence=$$(node -p "require('$$tmp/package/package.json').license") && \
		{ [ "$$licence" = BSD-2-Clause ] || { echo "niivue: NiiVue $(NIIVUE_VERSION) declares the licence $$licence, not niivue.LICENSE's BSD-2-Clause." >&2; false; }; } && \
		{ echo "$(NIIVUE_SHA256)  $$tmp/package/dist/niivue.umd.js" | sha256sum --check --quiet - || { echo "niivue: dist/niivue.umd.js of NiiVue $(NIIVUE_VERSION) is not the one pinned (NIIVUE_SHA256)." >&2; false; }; } && \
		mkdir -p $(@D) && cp $$tmp/package/dist/niivue.umd.js $@.tmp && mv $@.tmp $@; status=$$?; rm -rf $$tmp; exit $$status

niivue: $(NIIVUE_JS)

# Everything CI checks: the layers of docs/architecture.md (import-linter contracts in
# pyproject.toml), the documentation site (no broken link), then every test tier.
test: $(VENV)/.installed-$(EXTRAS)-test $(NIIVUE_JS)
	@$(MAKE) --no-print-directory serve-onnx-env || echo "serve-onnx-env: not built; the test that serves the onnxruntime variant skips." >&2
	$(VENV)/bin/lint-imports
	$(MAKE) --no-print-directory docs
	$(PY) -m pytest

# The unit and wiring tiers only: no KedroSession, training run, server or subprocess.
test-quick: $(VENV)/.installed-$(EXTRAS)-test $(NIIVUE_JS)
	$(PY) -m pytest -m "not integration"

# The documentation site into site/ (browse it with `.venv/bin/mkdocs serve`). Its diagrams are
# drawn by Mermaid served with the site, not from a CDN: the script is fetched once from the npm
# registry (npm checks the package's integrity) into docs/assets/javascripts/, which git ignores;
# after that the site builds and reads offline.
MERMAID_VERSION := 11.17.2
MERMAID_JS := docs/assets/javascripts/mermaid.min.js

$(MERMAID_JS):
	@command -v npm >/dev/null || { echo "docs: npm fetches Mermaid $(MERMAID_VERSION) once for the site's diagrams; install Node.js and npm (apt-get install npm)." >&2; exit 1; }
	@tmp=$$(mktemp -d) && (cd $$tmp && npm pack --silent mermaid@$(MERMAID_VERSION) >/dev/null) && \
		tar -xzf $$tmp/mermaid-$(MERMAID_VERSION).tgz -C $$tmp package/dist/mermaid.min.js && \
		cp $$tmp/package/dist/mermaid.min.js $@.tmp && mv $@.tmp $@; status=$$?; rm -rf $$tmp; exit $$status

docs: $(VENV)/.installed-$(EXTRAS)-test $(MERMAID_JS)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

# Optional, for the DICOM tests that skip without them: Debian's dcm2niix (geometry against an
# independent converter), dicom3tools (dciodvfy validates the DICOM SEGs), and Orthanc with its
# DICOMweb plugin (a real PACS for the DICOMweb tests; the packages' own service is not started:
# the tests start Orthanc with a configuration of their own). Needs root and apt.
dicom-tools:
	@if command -v dcm2niix >/dev/null && command -v dciodvfy >/dev/null && [ -x /usr/sbin/Orthanc ] && \
		[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then echo "dicom-tools: needs root and apt-get" >&2; exit 1; fi; \
	timeout 600 apt-get update -qq && DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -qq \
		dcm2niix dicom3tools orthanc orthanc-dicomweb >/dev/null

# Optional, for the viewer page's browser test, which skips without it: Debian's chromium, run
# headless with WebGL2 drawn by SwiftShader (no GPU needed). Needs root and apt.
browser-tools:
	@if command -v chromium >/dev/null; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then echo "browser-tools: needs root and apt-get" >&2; exit 1; fi; \
	timeout 600 apt-get update -qq && DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -qq chromium >/dev/null

viz: $(VENV)/.installed-$(EXTRAS)
	$(VENV)/bin/kedro viz run --no-browser

# Each script exits 1 when it misses a target; the first one that does stops the loop and fails
# the target. Files starting with `_` are shared helpers, not benchmarks.
benchmarks: $(VENV)/.installed-$(EXTRAS)
	for script in benchmarks/[!_]*.py; do $(PY) $$script || exit 1; done

clean-data:
	find data -mindepth 2 ! -name .gitkeep -delete

# The serving environment of a segmenter's onnxruntime variant (`<model>_segmenter_onnx`): built
# with pip from the requirements that variant logs (medseg.serving.model.pip_requirements), which
# hold no TensorFlow and no Keras. tests/test_serving.py serves the variant from it with
# `mlflow models serve --env-manager local`: MLflow's default virtualenv manager would fetch
# Python through pyenv, which cannot work offline. Rebuilt when pyproject.toml changes; a failed
# build leaves nothing (the test then skips, naming this target).
SERVE_ONNX := .venv-serve-onnx

$(SERVE_ONNX)/.installed: pyproject.toml | $(VENV)/.installed-$(EXTRAS)-test
	rm -rf $(SERVE_ONNX)
	$(PYTHON) -m venv $(SERVE_ONNX)
	$(PY) -c "from medseg.serving.model import pip_requirements; print('\\n'.join(pip_requirements('onnxruntime')))" \
		> $(SERVE_ONNX)/requirements.txt
	$(SERVE_ONNX)/bin/python -m pip install --quiet -r $(SERVE_ONNX)/requirements.txt || { rm -rf $(SERVE_ONNX); exit 1; }
	touch $@

serve-onnx-env: $(SERVE_ONNX)/.installed
