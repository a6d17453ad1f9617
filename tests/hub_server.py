"""A loopback HTTP server answering the Hub's file endpoint (`/{repo_id}/resolve/{revision}/{filename}`).

huggingface_hub's real download client talks to it when `HF_ENDPOINT` (or `huggingface_hub.constants.ENDPOINT`)
points here. It serves folders as repos, sends the headers the client needs (X-Repo-Commit, ETag, Content-Length)
and the Hub's error codes for missing repos and files, and records every file request.
"""
import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, List, Tuple
from urllib.parse import unquote

COMMIT = 'a' * 40


class HubServer:

    def __init__(self, repos: Dict[str, Path]):
        self.repos = {k: Path(v) for k, v in repos.items()}
        self.requests: List[Tuple[str, str, str]] = []  # (method, repo_id, filename)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self, send_body: bool):
                path = unquote(self.path.split('?', 1)[0]).lstrip('/')
                parts = path.split('/')
                if len(parts) < 5 or parts[2] != 'resolve':
                    return self._error(404, 'EntryNotFound', send_body)
                repo_id, revision, filename = '/'.join(parts[:2]), parts[3], '/'.join(parts[4:])
                server.requests.append((self.command, repo_id, filename))
                folder = server.repos.get(repo_id)
                if folder is None:
                    return self._error(404, 'RepoNotFound', send_body)
                if revision not in ('main', COMMIT):
                    return self._error(404, 'RevisionNotFound', send_body)
                file = folder / filename
                if not file.is_file():
                    return self._error(404, 'EntryNotFound', send_body)
                data = file.read_bytes()
                self.send_response(200)
                self.send_header('Content-Type', 'application/octet-stream')
                self.send_header('Content-Length', str(len(data)))
                self.send_header('ETag', '"' + hashlib.sha256(data).hexdigest() + '"')
                self.send_header('X-Repo-Commit', COMMIT)
                self.end_headers()
                if send_body:
                    self.wfile.write(data)

            def _error(self, status, code, send_body):
                body = b'{"error": "' + code.encode() + b'"}'
                self.send_response(status)
                self.send_header('X-Error-Code', code)
                self.send_header('X-Error-Message', code)
                self.send_header('Content-Type', 'application/json')
                self.send_header('Content-Length', str(len(body)))
                self.end_headers()
                if send_body:
                    self.wfile.write(body)

            def do_HEAD(self):
                self._answer(send_body=False)

            def do_GET(self):
                self._answer(send_body=True)

        self.httpd = ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.url = f'http://127.0.0.1:{self.httpd.server_address[1]}'
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def files_fetched(self, method: str = 'GET') -> List[str]:
        return [f for m, _, f in self.requests if m == method]

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
