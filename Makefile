# Every step the project needs; .ci/run calls `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo run sandbox test lint schemas bench bench-fence bench-stays soak soak-cluster cluster-start cluster-stop clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@echo "creating $(VENV) and installing the package with its dev tools (about 20 s the first time)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --progress-bar off -e '.[dev]'
	touch $(STAMP)
	@echo "installed: $(BIN)/ikw (not on your PATH: run it by that path, or source $(BIN)/activate)"

demo: install  ## the whole job once against the local stand-ins (needs RabbitMQ on AMQP_URL)
	$(BIN)/ikw demo

run: install  ## the worker, configured from the environment
	$(BIN)/ikw run

sandbox: install  ## serve the Seam, Twilio and SMTP stand-ins on fixed ports
	$(BIN)/ikw sandbox

test: install  ## unit and integration tests (needs RabbitMQ on 127.0.0.1:5672)
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check worker tests bench examples
	$(BIN)/ruff format --check worker tests bench examples
	$(BIN)/mypy
	$(BIN)/mypy --strict examples/producers/python/producer.py

schemas: install  ## re-export schemas/ from the models
	$(BIN)/ikw schema --out schemas

# The bench extra (Celery, gevent) only here: `make install` and CI leave it out.
bench: install  ## one worker at 0, 50 and 200 ms per Seam call, against the floor and the Celery peer
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	$(BIN)/python bench/throughput.py --latencies 0,50,200 --peer celery

bench-fence: install  ## a fence of 1,000,000 revokes: a fresh replica's seconds to ready, records/s, RSS
	$(BIN)/python bench/fence.py

bench-stays: install  ## 100,000 stays days ahead: the broker's memory and disk per stay, a fresh replica's seconds to ready
	$(BIN)/python bench/stays.py

soak: install  ## fault soak: lost and duplicate keys must print 0
	$(BIN)/python bench/soak.py

# A three-node RabbitMQ cluster on 5701-5703 (root or the rabbitmq user; the broker on 5672 is
# left alone). `bench/cluster run` always stops the cluster after the soak, failed or not.
soak-cluster: install  ## the soak on a 3-node cluster: leader stopped, a node SIGKILLed, a rolling restart
	bench/cluster run $(BIN)/python bench/soak.py --cluster --deadline 1500

cluster-start:  ## the bench's 3-node cluster (AMQP_URL printed)
	bench/cluster start

cluster-stop:
	bench/cluster stop

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
