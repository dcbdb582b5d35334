# nri-seccomp developer targets. Every target installs what it needs itself:
# Debian packages with apt-get, Python packages into ./.venv with pip.
SYSTEM_PYTHON ?= python3
VENV ?= .venv
PYTHON := $(VENV)/bin/python
APT_PACKAGES := docker-registry libseccomp2 skopeo golang-github-containers-common
PROTO_FILES := $(wildcard proto/nri_seccomp/nri/pb/*.proto) \
	$(wildcard proto/nri_seccomp/containerd/pb/*.proto)
# the containerd services the plugin calls over gRPC (images, content) also get stubs
GRPC_PROTO_FILES := $(wildcard proto/nri_seccomp/containerd/pb/*.proto)

.PHONY: deps proto test lint demo bench install clean

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

bench: deps
	$(PYTHON) -m bench

# Install as a pre-installed NRI plugin (containerd runs /opt/nri/plugins/IDX-NAME).
install: deps
	install -d /opt/nri/plugins /etc/nri/conf.d
	printf '#!/bin/sh\nexec %s -m nri_seccomp "$$@"\n' "$(abspath $(PYTHON))" > /opt/nri/plugins/10-seccomp-oci
	chmod 0755 /opt/nri/plugins/10-seccomp-oci
	[ -e /etc/nri/conf.d/10-seccomp-oci.conf ] || install -m 0644 config/nri-seccomp.yaml /etc/nri/conf.d/10-seccomp-oci.conf

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis build *.egg-info
