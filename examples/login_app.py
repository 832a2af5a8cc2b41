"""An app with its own login that mounts the chat API under /ai: each user sees their own
conversations. gunicorn -k gevent login_app:app, then sign in at /login?user=alice."""

from flask import Flask, redirect, request, session

from streaming import LLMStreaming

app = Flask(__name__)
app.config["SECRET_KEY"] = "change me"  # signs the session cookie
app.config["DATABASE_URL"] = "sqlite:///chat.db"  # or any setting of the service's, or the environment's


@app.get("/")
def home():
    user = session.get("user")
    return f"Signed in as {user}. <a href='/ai/'>Chat</a>" if user else "<a href='/login?user=alice'>Sign in</a>"


@app.get("/login")
def login():
    session["user"] = request.args["user"]  # a real app checks a password here
    return redirect("/")


@app.post("/logout")
def logout():
    session.clear()
    return redirect("/")


# identify() returns the owner of the request's conversations, or None: a 401.
LLMStreaming(app, url_prefix="/ai", identify=lambda: session.get("user"))
