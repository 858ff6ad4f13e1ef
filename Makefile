.PHONY: install up test
install:
	scripts/install.sh
up: install
	.venv/bin/tokenfleet up $(ARGS)
test:
	scripts/test.sh
