# Megaphone: the Go sidecar and the Erlang shim.
#
#   make run    install what is missing, build, start a private ejabberd with
#               the shim loaded, and serve clients through the sidecar
#   make test   every test: Go (race detector), EUnit, and the integration
#               tests against real ejabberd nodes (Debian 12's on the host,
#               Debian 13's in a chroot) and real npm clients

# Go lives in /usr/local/go on our machines; a root shell may not have it on PATH.
export PATH := $(PATH):/usr/local/go/bin

GO      ?= go
REBAR3  ?= rebar3
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
SHIM_EBIN := $(CURDIR)/_build/default/lib/megaphone/ebin

.PHONY: all deps deps-trixie build sidecar shim test unit-test go-unit eunit integration run fuzz fuzz-short vet clean bench bench-tsung bench-scale soak

all: build

deps:
	bash scripts/deps.sh

# The second test target: ejabberd 24.12 on OTP 27 in a Debian 13 chroot,
# cached outside the repo (MEGAPHONE_TRIXIE_ROOT, default
# /var/cache/megaphone/trixie). Built once (about a minute), then only its
# mounts are checked. Tests find it through test/harness.Targets.
deps-trixie:
	bash scripts/trixie-chroot.sh

build: sidecar shim

sidecar:
	$(GO) build -ldflags "-X main.version=$(VERSION)" -o bin/megaphone ./cmd/megaphone

shim:
	$(REBAR3) compile

vet:
	$(GO) vet ./...

# Unit tests: fast, no ejabberd needed.
unit-test: vet go-unit eunit

go-unit:
	$(GO) test -race -count=1 ./etf/... ./node/... ./bosh/... ./sockets/... ./xmlstream/... ./metrics/... ./sidecar/... ./cmd/megaphone/...

eunit:
	$(REBAR3) eunit

# Integration tests start their own ejabberd nodes and npm clients; they
# find the sidecar binary and the shim through these variables. Tests that
# mostly wait for timeouts run four at a time once the others are done
# (waitsOnTimers in test/main_test.go); -timeout is a guard against a hang,
# not the budget.
# The benchmark and its scale run also run here at a tiny size (about 3
# minutes), so that they keep working; go test runs that package beside
# the integration tests (two packages at a time), which mostly wait.
integration: build
	MEGAPHONE_BIN=$(CURDIR)/bin/megaphone MEGAPHONE_SHIM_EBIN=$(SHIM_EBIN) \
		$(GO) test -count=1 -timeout 30m -parallel 4 -v ./test/... ./cmd/megaphone-bench/...

test: deps deps-trixie build unit-test integration

# The soak: SOAK_DURATION of mixed load through one sidecar (a Strophe.js
# BOSH swarm of SOAK_SESSIONS users, @xmpp/client pairs over STARTTLS,
# direct TLS and WebSocket), everyone logging in and out again each
# minute; it fails unless every round is clean and memory, goroutines,
# sockets and processes on both sides end where the first round left them.
# Not part of make test. Figures: docs/RELIABILITY.md.
SOAK_DURATION ?= 30m
SOAK_SESSIONS ?= 1000
SOAK_TIMEOUT  ?= 3h
soak: deps build
	MEGAPHONE_BIN=$(CURDIR)/bin/megaphone MEGAPHONE_SHIM_EBIN=$(SHIM_EBIN) \
		MEGAPHONE_SOAK_DURATION=$(SOAK_DURATION) MEGAPHONE_SOAK_SESSIONS=$(SOAK_SESSIONS) \
		$(GO) test -count=1 -timeout $(SOAK_TIMEOUT) -run '^TestSoak$$' -v ./test/

run: deps build
	$(GO) build -o bin/megaphone-dev ./cmd/megaphone-dev
	MEGAPHONE_BIN=$(CURDIR)/bin/megaphone MEGAPHONE_SHIM_EBIN=$(SHIM_EBIN) bin/megaphone-dev

# Benchmarks: Megaphone vs ejabberd's own listeners, per transport (TCP,
# direct TLS, WebSocket, BOSH with the sidecar relaying to ejabberd_bosh,
# and BOSH at the edge, "bosh-edge": the sidecar in --bosh-mode edge; both
# BOSH columns against mod_bosh), on one node in one run: idle-session
# memory at each of BENCH_N (comma-separated, each at most 19000: the
# open-files limit), 1:1 chat throughput and latency with BENCH_PAIRS pairs
# on every transport. The report goes to stdout and bench.out.md, the plots
# to bench/*.png. About 11-12 minutes at the defaults (2-core box); e.g.
# BENCH_N=1000,5000,19000 for the heavier run, BENCH_FLAGS='-transports
# bosh,bosh-edge' for BOSH alone.
BENCH_N     ?= 1000,5000
BENCH_PAIRS ?= 200
BENCH_FLAGS ?=
bench: deps build
	bash scripts/bench-deps.sh
	$(GO) build -o bin/megaphone-bench ./cmd/megaphone-bench
	MEGAPHONE_BIN=$(CURDIR)/bin/megaphone MEGAPHONE_SHIM_EBIN=$(SHIM_EBIN) \
		bin/megaphone-bench -n $(BENCH_N) -pairs $(BENCH_PAIRS) -out bench.out.md -plots bench $(BENCH_FLAGS)

# The idle measurement driven by Tsung 1.7 (bench/tsung/*.xml) against both
# paths on fixed loopback ports (15222/15280 native, 25222/25280 Megaphone).
# About 5 minutes; the report goes to bench-tsung.out.md.
bench-tsung: deps build
	bash scripts/bench-deps.sh
	$(GO) build -o bin/megaphone-bench ./cmd/megaphone-bench
	MEGAPHONE_BIN=$(CURDIR)/bin/megaphone MEGAPHONE_SHIM_EBIN=$(SHIM_EBIN) \
		bin/megaphone-bench -tsung -tsung-dir bench/tsung -out bench-tsung.out.md

# The scale run (issue 7): one node, SCALE_N/16000 sidecars sharing one port
# with --reuseport, one load-generator process per 18,500 sessions; idle TCP
# sessions ramp to SCALE_N in steps (20k, 50k, 100k, 150k, 200k, 250k), then
# ejabberd's own listener ramps until it fails (its open-files limit). It
# stops early and logs everything out when MemAvailable falls below 3 GiB
# or logins fail, or on Ctrl-C. The report goes to bench-scale.out.md. About
# 30 minutes at 250,000 on a quiet 2-core machine; it needs ~15 GiB.
SCALE_N     ?= 250000
SCALE_FLAGS ?=
bench-scale: deps build
	$(GO) build -o bin/megaphone-bench ./cmd/megaphone-bench
	MEGAPHONE_BIN=$(CURDIR)/bin/megaphone MEGAPHONE_SHIM_EBIN=$(SHIM_EBIN) \
		bin/megaphone-bench -scale $(SCALE_N) -out bench-scale.out.md $(SCALE_FLAGS)

# Fuzzing of every decoder that faces the network or the node, as
# package:FuzzName. `make fuzz` runs each for FUZZTIME, `make fuzz-short`
# for FUZZTIME_SHORT. A crash leaves its input in the package's
# testdata/fuzz/, where it stays as a regression seed: go-unit (so `make
# test`) runs every seed and every such input of every target, the same
# on every run.
#
# `make test` does not mutate. A gate must give the same answer for the
# same code, and fuzzing a few seconds draws new inputs every run: in one
# day it failed three CI runs, twice on real finds that had
# nothing to do with the change (they are fixed and kept as seeds) and
# once on Go's own fuzz coordinator (below). Run `make fuzz-short` (about
# a minute) or `make fuzz` before a change to a decoder lands.
#
# FUZZTIME_SHORT counts executions ("50000x") instead of seconds: with a
# duration, Go's fuzz coordinator can race its own deadline and fail a
# target with a bare "context deadline exceeded" and no crasher
# (go.dev/issue/75804, fixed in Go 1.27; we build with 1.26). A count has
# no deadline. 50000 executions take 2-10 s a target here. `make fuzz`
# keeps a duration, as long runs want; if one ends in that bare message,
# rerun it or pass FUZZTIME=500000x.
FUZZ_TARGETS := etf:FuzzDecode etf:FuzzShimMessage bosh:FuzzCheckBody bosh:FuzzEdgeRequestNoLaxerThanCheckBody bosh:FuzzHandler \
	xmlstream:FuzzParser xmlstream:FuzzFramer xmlstream:FuzzWebSocketFraming xmlstream:FuzzWriterHostileTerms \
	sockets:FuzzC2SNegotiation node:FuzzLinkDispatch
FUZZTIME ?= 2m
FUZZTIME_SHORT ?= 50000x
fuzz:
	@for t in $(FUZZ_TARGETS); do \
		echo "fuzz $$t for $(FUZZTIME)"; \
		$(GO) test ./$${t%%:*}/ -run '^$$' -fuzz "^$${t##*:}$$" -fuzztime $(FUZZTIME) || exit 1; \
	done

fuzz-short:
	$(MAKE) fuzz FUZZTIME=$(FUZZTIME_SHORT)

clean:
	rm -rf bin _build .run
