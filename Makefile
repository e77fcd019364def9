# earshot: `make run` installs into .venv and runs the daemon; `make test` installs and runs every test.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
CONFIG ?= systemd/earshot.toml
APT_PACKAGES := mosquitto pulseaudio pulseaudio-utils libportaudio2 libsndfile1 ffmpeg tmux libasound2-plugins chromium chromium-driver

.PHONY: run test install install-test apt clean bench bench-daemon install-service

$(VENV)/.installed: pyproject.toml
	@echo "earshot: installing into $(VENV) (numpy, scipy, torch: a minute or more the first time)..."
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install -e .
	@echo "earshot: installed; $(VENV)/bin/earshot --help lists the commands"
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

# System packages the tests use (a real broker, a virtual microphone, ffmpeg); only when run as root.
apt:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
		if [ -n "$$missing" ]; then \
			echo "installing: $$missing"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
		fi; \
	else echo "not root: skipping apt packages ($(APT_PACKAGES)); tests that need them will be skipped"; fi

run: install
	@echo "earshot: starting with $(CONFIG) (Ctrl-C stops; make run CONFIG=FILE for another configuration)"
	$(VENV)/bin/earshot run --config $(CONFIG) --demo-if-no-device

test: apt $(VENV)/.installed-test
	$(VENV)/bin/pytest -q

# As root: the earshot user, the systemd unit (ExecStart = this checkout's .venv), /etc/earshot/earshot.toml,
# /var/lib/earshot, then enable --now. ROOT=/path installs into another root; DRY_RUN=1 only prints the steps.
install-service: install
	$(VENV)/bin/earshot install-service $(if $(ROOT),--root $(ROOT)) $(if $(DRY_RUN),--dry-run)

bench: install
	$(PY) tools/bench.py

# The whole daemon (real `earshot run`, file sources at real time, a real Mosquitto) beside the scorer alone.
bench-daemon: install
	$(PY) tools/bench_daemon.py --streams 1,10,100 --max

clean:
	rm -rf $(VENV) build *.egg-info daemon/*.egg-info .pytest_cache
