"""The HTTP service's FastAPI application, one router per resource (FastAPI's "bigger
applications" layout). `serve_app.py` wraps it in the Ray Serve deployment.

    service/app.py          the app factory: routers, exception handlers
    service/auth.py         the bearer-token dependency (applied per router)
    service/errors.py       the API's error body and the HTTP status of each typed error
    service/uploads.py      multipart uploads streamed to disk
    service/backend.py      what the routes share: admission, staging inputs, submitting, results
    service/routers/*.py    jobs, avatars, batches, compat (/easy, /upload), media (results, HLS), health
    service/launch.py       `lipsync serve`: Ray, the job manager and the Serve app on one port
"""
