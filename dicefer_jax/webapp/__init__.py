"""A local web page for a trained model: photos and a webcam in, expressions out.

`make_app(predictor, model_info)` is the ASGI app (Starlette); entry points run
it with uvicorn (`experiments.serve`). Its static page lives in `static/`.
Needs the optional `web` extra (starlette, uvicorn, python-multipart).
"""
