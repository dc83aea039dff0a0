// services/mesh_launcher_fake_server.cc: a stand-in for dserve-router,
// dserve-prefill and dserve-decode in mesh_launcher_test. It follows their
// command-line contract (the role comes from the name it is run under),
// serves grpc.health.v1 and, whatever its role, a scripted
// dserve.v1.Inference (EchoInference), prints "<service> listening on
// HOST:PORT", and on SIGTERM exits 0. It records its arguments and config,
// and the time it stopped, in $FAKE_MESH_LOG_DIR/<worker-id>.{args,config,stopped}.
//
// Environment knobs, each naming a worker id ("router" for the router):
//   FAKE_MESH_FAIL=ID          that process exits 3 before listening
//   FAKE_MESH_IGNORE_TERM=ID   that process ignores SIGTERM
//   FAKE_MESH_NEVER_SERVING=ID that process's health stays NOT_SERVING
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "dserve/v1/inference.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "grpcpp/health_check_service_interface.h"

namespace {

std::string Env(const char* name) {
  const char* v = std::getenv(name);
  return v ? v : "";
}

// EchoInference: what the stand-in router answers. Generate streams
// max_tokens (default 4) tokens 100, 101, ... one chunk each with text
// " t0", " t1", ...; max_tokens above 1000 is INVALID_ARGUMENT.
class EchoInference final : public dserve::v1::Inference::Service {
 public:
  grpc::Status Generate(grpc::ServerContext*, const dserve::v1::GenerateRequest* request,
                        grpc::ServerWriter<dserve::v1::GenerateResponse>* writer) override {
    const int n = request->has_max_tokens() ? request->max_tokens() : 4;
    if (n > 1000) {
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                          "max_tokens must be in [1, 1000], got " + std::to_string(n));
    }
    for (int i = 0; i < n; ++i) {
      dserve::v1::GenerateResponse r;
      r.set_request_id(request->request_id().empty() ? "fake-1" : request->request_id());
      r.mutable_chunk()->add_token_ids(100 + i);
      r.mutable_chunk()->set_text(" t" + std::to_string(i));
      writer->Write(r);
    }
    dserve::v1::GenerateResponse done;
    done.mutable_complete()->set_finish_reason(dserve::v1::FINISH_REASON_LENGTH);
    done.mutable_complete()->mutable_usage()->set_prompt_tokens(
        request->has_token_ids() ? request->token_ids().ids_size()
                                 : static_cast<int>(request->text().size()));
    done.mutable_complete()->mutable_usage()->set_completion_tokens(n);
    writer->Write(done);
    return grpc::Status::OK;
  }
  grpc::Status GetModelInfo(grpc::ServerContext*, const dserve::v1::GetModelInfoRequest*,
                            dserve::v1::ModelInfo* info) override {
    info->set_name("fake");
    info->set_vocab_size(384);
    info->set_max_context_tokens(64);
    return grpc::Status::OK;
  }
};

}  // namespace

int main(int argc, char** argv) {
  sigset_t stop;
  sigemptyset(&stop);
  sigaddset(&stop, SIGTERM);
  sigaddset(&stop, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop, nullptr);

  std::string self = argv[0];
  self = self.substr(self.rfind('/') + 1);
  const std::string service = self == "dserve-router"    ? "router"
                              : self == "dserve-prefill" ? "prefill"
                                                         : "decode";
  std::string id = service == "router" ? "router" : "", listen = "127.0.0.1:0", config;
  std::vector<std::string> args(argv + 1, argv + argc);
  for (size_t i = 0; i + 1 < args.size(); ++i) {
    if (args[i] == "--worker-id") id = args[i + 1];
    if (args[i] == "--listen") listen = args[i + 1];
    if (args[i] == "--config") config = args[i + 1];
  }
  const std::string dir = Env("FAKE_MESH_LOG_DIR");
  {
    std::ofstream out(dir + "/" + id + ".args");
    for (const std::string& a : args) out << a << "\n";
    std::ifstream in(config);
    std::stringstream text;
    text << in.rdbuf();
    std::ofstream(dir + "/" + id + ".config") << text.str();
  }
  if (Env("FAKE_MESH_FAIL") == id) {
    std::cerr << id << ": failing on purpose\n";
    return 3;
  }

  grpc::EnableDefaultHealthCheckService(true);
  grpc::ServerBuilder builder;
  EchoInference inference;
  builder.RegisterService(&inference);
  int port = 0;
  builder.AddListeningPort(listen, grpc::InsecureServerCredentials(), &port);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (!server || port == 0) {
    std::cerr << id << ": cannot listen on " << listen << "\n";
    return 2;
  }
  const bool serving = Env("FAKE_MESH_NEVER_SERVING") != id;
  server->GetHealthCheckService()->SetServingStatus(serving);
  const std::string host = listen.substr(0, listen.rfind(':'));
  std::cout << "a line before the address\n";
  std::cout << service << " listening on " << host << ":" << port << "\n";
  std::cout << "a line after the address" << std::endl;

  if (Env("FAKE_MESH_IGNORE_TERM") == id) sigdelset(&stop, SIGTERM);
  int sig = 0;
  sigwait(&stop, &sig);
  const auto now = std::chrono::steady_clock::now().time_since_epoch();
  std::ofstream(dir + "/" + id + ".stopped")
      << std::chrono::duration_cast<std::chrono::nanoseconds>(now).count() << "\n";
  // As the real servers do: a bounded drain, then cancel what is left.
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::milliseconds(200));
  return 0;
}
