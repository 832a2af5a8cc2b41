"""The gunicorn entry point: `gunicorn -c gunicorn.conf.py app:app`."""

from streaming import create_app

app = create_app()
