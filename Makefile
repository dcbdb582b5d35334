# nri-seccomp developer targets. Every target installs what it needs itself:
# Debian packages with apt-get, Python packages into ./.venv with pip.
SYSTEM_PYTHON ?= python3
VENV ?= .venv
PYTHON := $(VENV)/bin/python
# umoci builds the image (make image), tini (its tini-static) is the image's PID 1;
# runc runs it in tests/test_image.py
APT_PACKAGES := docker-registry libseccomp2 skopeo golang-github-containers-common systemd \
	umoci runc tini
PROTO_FILES := $(wildcard proto/nri_seccomp/nri/pb/*.proto) \
	$(wildcard proto/nri_seccomp/containerd/pb/*.proto)
# the containerd services the plugin calls over gRPC (images, content) also get stubs
GRPC_PROTO_FILES := $(wildcard proto/nri_seccomp/containerd/pb/*.proto)

.PHONY: deps proto test lint demo bench bench-deploy bundle image install install-service uninstall lock clean runtime-deps install-runtime \
	install-runtime-venv install-runtime-bundle

# Debian packages (skipped when present), then a virtualenv with our package.
deps: $(VENV)/.installed
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "apt-get install:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

$(VENV)/.installed: pyproject.toml
	[ -x $(PYTHON) ] || $(SYSTEM_PYTHON) -m venv $(VENV)
	$(PYTHON) -m pip install -q -e ".[dev]"
	touch $@

# Regenerate the protobuf message code (and the gRPC stubs) from our .proto files.
proto: $(VENV)/.installed
	$(PYTHON) -m grpc_tools.protoc -I proto --python_out=. --pyi_out=. $(PROTO_FILES)
	$(PYTHON) -m grpc_tools.protoc -I proto --grpc_python_out=. \
	  $(filter-out %/descriptor.proto,$(GRPC_PROTO_FILES))

test: deps
	$(PYTHON) -m pytest -q -p no:cacheprovider

lint: deps
	$(PYTHON) -m ruff check nri_seccomp devtools tests bench
	$(PYTHON) -m mypy nri_seccomp devtools

# A local registry, a sample annotated pod, and the linux.seccomp it gets.
demo: deps
	$(PYTHON) -m devtools.demo

bench: deps bundle
	$(PYTHON) -m bench

# start-up to registration (venv, installed tree, bundle) and crash recovery times
bench-deploy: deps
	$(PYTHON) -m bench.deploy

# ---- node install: the run-time needs only, under PREFIX, independent of this checkout
# (no .venv, no test tools, no [dev] extras). DESTDIR stages the tree elsewhere.
PREFIX ?= /opt/nri-seccomp
DESTDIR ?=
NRI_PLUGIN_DIR ?= /opt/nri/plugins
NRI_CONF_DIR ?= /etc/nri/conf.d
LOG_DIR ?= /var/log/nri-seccomp
CONFIG_DIR ?= /etc/nri-seccomp
SYSTEMD_DIR ?= /etc/systemd/system
# Debian's interpreter: the installed tree's compiled wheels are built for it
RUNTIME_PYTHON ?= /usr/bin/python3
RUNTIME_APT := python3 python3-venv libseccomp2
LOCK := packaging/requirements.lock
PKG_VENV := build/pkgvenv
STAGE := $(DESTDIR)$(PREFIX)
# What runs under PREFIX: `venv` (Debian's python3 on the pinned packages, lib/python)
# or `bundle` (the PyInstaller onedir BUNDLE_DIR, under bundle/: no Python on the node).
# Either way $(PREFIX)/bin/nri-seccomp starts it, the path the plugin entry and the
# unit's ExecStart name.
FROM ?= venv
BUNDLE_DIR ?= dist/nri-seccomp
ifeq ($(filter $(FROM),venv bundle),)
$(error FROM=$(FROM): use FROM=venv (default) or FROM=bundle)
endif

runtime-deps:
	@missing=""; for p in $(RUNTIME_APT); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "apt-get install:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

install-runtime: install-runtime-$(FROM)

# The runtime under PREFIX: lib/python holds the pinned dependencies and our wheel
# (pip --target, so no path of the build is baked in), bin/nri-seccomp runs Debian's
# python3 in isolated mode on that directory alone.
install-runtime-venv: runtime-deps
	[ -x $(PKG_VENV)/bin/pip ] || $(RUNTIME_PYTHON) -m venv $(PKG_VENV)
	rm -rf build/wheel $(STAGE)/lib/python $(STAGE)/bundle
	rm -f $(STAGE)/bin/nri-seccomp
	$(PKG_VENV)/bin/pip wheel -q --no-deps -w build/wheel .
	$(PKG_VENV)/bin/pip install -q --no-deps --target $(STAGE)/lib/python -r $(LOCK) \
	  build/wheel/nri_seccomp-*.whl
	rm -rf $(STAGE)/lib/python/bin
	install -d $(STAGE)/bin $(STAGE)/share
	sed 's|@PYTHON@|$(shell readlink -f $(RUNTIME_PYTHON))|' packaging/nri-seccomp.in > $(STAGE)/bin/nri-seccomp
	chmod 0755 $(STAGE)/bin/nri-seccomp
	install -m 0644 $(LOCK) config/nri-seccomp.yaml $(STAGE)/share/
	install -d -m 0750 $(DESTDIR)$(LOG_DIR)

# The bundle under PREFIX/bundle, as built (`make bundle`, on a build machine: this
# target never builds it, needs no Python and no package of the node), and
# bin/nri-seccomp a relative symlink to its executable (PyInstaller's bootloader finds
# its _internal/ from the resolved path; tests/test_install.py starts it so).
install-runtime-bundle:
	@[ -x $(BUNDLE_DIR)/nri-seccomp ] || { echo "$(BUNDLE_DIR)/nri-seccomp is missing:" \
	  "run \`make bundle\` first (on a build machine), or set BUNDLE_DIR" >&2; exit 1; }
	rm -rf $(STAGE)/lib/python $(STAGE)/bundle $(STAGE)/share/requirements.lock
	rm -f $(STAGE)/bin/nri-seccomp
	install -d $(STAGE)/bin $(STAGE)/share
	cp -RP $(BUNDLE_DIR) $(STAGE)/bundle
	ln -s ../bundle/nri-seccomp $(STAGE)/bin/nri-seccomp
	install -m 0644 config/nri-seccomp.yaml $(STAGE)/share/
	install -d -m 0750 $(DESTDIR)$(LOG_DIR)

# Pre-installed plugin: containerd starts /opt/nri/plugins/10-seccomp-oci itself (it execs
# $(PREFIX)/bin/nri-seccomp, whichever FROM installed it).
install: install-runtime
	install -d $(DESTDIR)$(NRI_PLUGIN_DIR) $(DESTDIR)$(NRI_CONF_DIR)
	sed -e 's|@PREFIX@|$(PREFIX)|' -e 's|@LOG_DIR@|$(LOG_DIR)|' packaging/10-seccomp-oci.in \
	  > $(DESTDIR)$(NRI_PLUGIN_DIR)/10-seccomp-oci
	chmod 0755 $(DESTDIR)$(NRI_PLUGIN_DIR)/10-seccomp-oci
	[ -e $(DESTDIR)$(NRI_CONF_DIR)/10-seccomp-oci.conf ] || \
	  install -m 0644 config/nri-seccomp.yaml $(DESTDIR)$(NRI_CONF_DIR)/10-seccomp-oci.conf

# External plugin under systemd instead (do not also install the pre-installed entry:
# two plugins would register as seccomp-oci). ExecStart is $(PREFIX)/bin/nri-seccomp
# for FROM=venv and FROM=bundle alike.
install-service: install-runtime
	install -d $(DESTDIR)$(SYSTEMD_DIR) $(DESTDIR)$(CONFIG_DIR)
	sed 's|/opt/nri-seccomp|$(PREFIX)|g' packaging/nri-seccomp.service > $(DESTDIR)$(SYSTEMD_DIR)/nri-seccomp.service
	[ -e $(DESTDIR)$(CONFIG_DIR)/config.yaml ] || \
	  install -m 0644 config/nri-seccomp.yaml $(DESTDIR)$(CONFIG_DIR)/config.yaml

# Removes the program (either runtime: all of PREFIX); keeps configuration, logs and
# the profile cache.
uninstall:
	rm -rf $(DESTDIR)$(PREFIX)
	rm -f $(DESTDIR)$(NRI_PLUGIN_DIR)/10-seccomp-oci $(DESTDIR)$(SYSTEMD_DIR)/nri-seccomp.service

# dist/nri-seccomp/: the plugin with its own interpreter and libseccomp (PyInstaller
# onedir); needs glibc >= the build machine's (2.36 on Debian 12) and nothing else.
# Rebuilt only when a source, the spec or the virtualenv changed: the tests that use it
# (test_bundle, test_image) each run `make bundle`, and PyInstaller then runs once.
BUNDLE_EXE := dist/nri-seccomp/nri-seccomp
BUNDLE_SRC := $(shell find nri_seccomp -name '*.py') $(wildcard packaging/*.py) \
	packaging/nri-seccomp.spec
bundle: deps $(BUNDLE_EXE)

$(BUNDLE_EXE): $(VENV)/.installed $(BUNDLE_SRC)
	$(PYTHON) -m PyInstaller --noconfirm --log-level WARN --distpath dist \
	  --workpath build/pyinstaller packaging/nri-seccomp.spec
	touch $@

# build/nri-seccomp-image.oci.tar: the bundle as an OCI image (no base, no registry,
# built with umoci; devtools/image.py says what is in it), named
# localhost/nri-seccomp:<version> as deploy/daemonset.yaml references it. Load it with
# `kind load image-archive`, `ctr -n k8s.io images import` or
# `skopeo copy oci-archive:build/nri-seccomp-image.oci.tar:<version> ...`.
# Layer, config and archive take their times from SOURCE_DATE_EPOCH (default: the last
# commit's), so the same bundle gives the same file.
IMAGE_ARCHIVE := build/nri-seccomp-image.oci.tar
image: bundle
	$(PYTHON) -m devtools.image --bundle dist/nri-seccomp --out $(IMAGE_ARCHIVE)

# packaging/requirements.lock from pyproject's run-time dependencies alone.
lock:
	rm -rf build/lockvenv
	$(RUNTIME_PYTHON) -m venv build/lockvenv
	build/lockvenv/bin/pip install -q .
	{ sed -n '1,2p' $(LOCK); build/lockvenv/bin/pip freeze --exclude nri-seccomp; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)

clean:
	rm -rf $(VENV) dist .pytest_cache .mypy_cache .ruff_cache .hypothesis build *.egg-info
