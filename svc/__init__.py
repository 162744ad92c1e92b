"""An idempotent RabbitMQ event consumer: the Python port of the "Reliability Nirvana" demo.

Run it with ``SERVICE_NAME=orders python -m svc``; see the README for the guarantees it keeps.
"""

import logging

logging.getLogger(__name__).addHandler(logging.NullHandler())
